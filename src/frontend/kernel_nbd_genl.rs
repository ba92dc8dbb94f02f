//! Generic netlink, just enough for the kernel NBD family (`nbd-netlink.h`).
//!
//! Owns the message encoding (netlink header, generic netlink header, attributes,
//! nested attributes), the decoding of replies (typed errors, never a panic on
//! bad input), family resolution through `nlctrl`, and a blocking socket with a
//! receive timeout so that a silent kernel can never hang a caller.
//!
//! Written with libc only: the handful of messages NBD needs does not justify a
//! netlink crate.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Netlink message header length.
const NLMSG_HDR_LEN: usize = 16;
/// Generic netlink header length.
const GENL_HDR_LEN: usize = 4;
/// Attribute header length.
const NLA_HDR_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// Flag on nested attributes (ignored by the kernel's deprecated parsers, set anyway).
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// Largest reply we accept (the kernel's replies to NBD commands are tiny).
const RECV_BUFFER_BYTES: usize = 64 * 1024;

/// NBD family constants (`include/uapi/linux/nbd-netlink.h`).
pub mod nbd {
    /// Family name.
    pub const FAMILY_NAME: &str = "nbd";
    /// Family version.
    pub const VERSION: u8 = 1;
    /// `NBD_CMD_CONNECT`.
    pub const CMD_CONNECT: u8 = 1;
    /// `NBD_CMD_DISCONNECT`.
    pub const CMD_DISCONNECT: u8 = 2;
    /// `NBD_CMD_RECONFIGURE`.
    pub const CMD_RECONFIGURE: u8 = 3;
    /// `NBD_ATTR_INDEX` (u32).
    pub const ATTR_INDEX: u16 = 1;
    /// `NBD_ATTR_SIZE_BYTES` (u64).
    pub const ATTR_SIZE_BYTES: u16 = 2;
    /// `NBD_ATTR_BLOCK_SIZE_BYTES` (u64).
    pub const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
    /// `NBD_ATTR_TIMEOUT` (u64, seconds).
    pub const ATTR_TIMEOUT: u16 = 4;
    /// `NBD_ATTR_SERVER_FLAGS` (u64, NBD transmission flags).
    pub const ATTR_SERVER_FLAGS: u16 = 5;
    /// `NBD_ATTR_CLIENT_FLAGS` (u64).
    pub const ATTR_CLIENT_FLAGS: u16 = 6;
    /// `NBD_ATTR_SOCKETS` (nested list of `NBD_SOCK_ITEM`).
    pub const ATTR_SOCKETS: u16 = 7;
    /// `NBD_ATTR_DEAD_CONN_TIMEOUT` (u64, seconds).
    pub const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
    /// `NBD_ATTR_BACKEND_IDENTIFIER` (string, shown in `/sys/block/nbdX/backend`).
    pub const ATTR_BACKEND_IDENTIFIER: u16 = 10;
    /// `NBD_SOCK_ITEM` (nested).
    pub const SOCK_ITEM: u16 = 1;
    /// `NBD_SOCK_FD` (u32).
    pub const SOCK_FD: u16 = 1;
}

/// Errors of the generic netlink layer.
#[derive(Debug, thiserror::Error)]
pub enum GenlError {
    /// A socket call failed.
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    /// The family is not registered (its module is not loaded).
    #[error("generic netlink family {0:?} is not registered")]
    NoFamily(String),
    /// The kernel answered with an error.
    #[error("kernel refused the request: {0}")]
    Kernel(io::Error),
    /// The kernel did not answer in time.
    #[error("no answer from the kernel within {0} ms")]
    Timeout(u64),
    /// A reply could not be decoded.
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

/// Builds the attribute part of a message.
#[derive(Default)]
pub struct AttrBuf {
    buf: Vec<u8>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl AttrBuf {
    /// An empty attribute list.
    pub fn new() -> Self {
        AttrBuf::default()
    }

    /// Appends an attribute with a raw payload.
    pub fn put(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = NLA_HDR_LEN + payload.len();
        assert!(len <= usize::from(u16::MAX), "netlink attribute too long");
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// Appends a u32 attribute.
    pub fn put_u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    /// Appends a u64 attribute.
    pub fn put_u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.put(kind, &v.to_ne_bytes())
    }

    /// Appends a NUL-terminated string attribute.
    pub fn put_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.put(kind, &v)
    }

    /// Appends a nested attribute holding `inner`.
    pub fn put_nested(&mut self, kind: u16, inner: &AttrBuf) -> &mut Self {
        self.put(kind | NLA_F_NESTED, &inner.buf)
    }

    /// The encoded attributes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// Encodes one generic netlink request.
pub fn encode_request(family: u16, cmd: u8, version: u8, seq: u32, attrs: &AttrBuf) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + GENL_HDR_LEN + attrs.buf.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(cmd);
    m.push(version);
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&attrs.buf);
    m
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits an attribute list into `(type, payload)` pairs (type without flag bits).
pub fn parse_attrs(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, GenlError> {
    let mut out = Vec::new();
    while b.len() >= NLA_HDR_LEN {
        let len = usize::from(u16_at(b, 0).ok_or(GenlError::Malformed("attribute header"))?);
        let kind = u16_at(b, 2).ok_or(GenlError::Malformed("attribute header"))? & NLA_TYPE_MASK;
        if len < NLA_HDR_LEN || len > b.len() {
            return Err(GenlError::Malformed("attribute length"));
        }
        out.push((kind, &b[NLA_HDR_LEN..len]));
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// Reads a u32 attribute payload.
pub fn attr_u32(payload: &[u8]) -> Result<u32, GenlError> {
    u32_at(payload, 0).ok_or(GenlError::Malformed("u32 attribute"))
}

/// One decoded message of a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// A data message: its attributes (after the generic netlink header).
    Data(Vec<u8>),
    /// An acknowledgement: 0 or a negative errno.
    Ack(i32),
    /// End of a dump.
    Done,
}

/// Decodes every message of one datagram whose sequence number is `seq`
/// (messages for other sequence numbers are skipped).
pub fn decode_replies(mut b: &[u8], seq: u32) -> Result<Vec<Reply>, GenlError> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDR_LEN {
        let len = u32_at(b, 0).ok_or(GenlError::Malformed("message header"))? as usize;
        let kind = u16_at(b, 4).ok_or(GenlError::Malformed("message header"))?;
        let mseq = u32_at(b, 8).ok_or(GenlError::Malformed("message header"))?;
        if len < NLMSG_HDR_LEN || len > b.len() {
            return Err(GenlError::Malformed("message length"));
        }
        let body = &b[NLMSG_HDR_LEN..len];
        if mseq == seq {
            match kind {
                NLMSG_ERROR => {
                    let err = u32_at(body, 0).ok_or(GenlError::Malformed("error message"))? as i32;
                    out.push(Reply::Ack(err));
                }
                NLMSG_DONE => out.push(Reply::Done),
                _ => {
                    if body.len() < GENL_HDR_LEN {
                        return Err(GenlError::Malformed("generic netlink header"));
                    }
                    out.push(Reply::Data(body[GENL_HDR_LEN..].to_vec()));
                }
            }
        }
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// A blocking generic netlink socket.
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
    timeout_ms: u64,
}

impl GenlSocket {
    /// Opens and binds a `NETLINK_GENERIC` socket; every receive times out after
    /// `timeout_ms`.
    pub fn open(timeout_ms: u64) -> Result<GenlSocket, GenlError> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl of the length passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let d = Duration::from_millis(timeout_ms);
        let tv = libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(d.subsec_micros() as i32),
        };
        // SAFETY: `tv` is a valid timeval of the length passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(GenlSocket {
            fd,
            seq: 1,
            timeout_ms,
        })
    }

    /// Sends one request and collects its data replies until the acknowledgement.
    pub fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &AttrBuf,
    ) -> Result<Vec<Vec<u8>>, GenlError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = encode_request(family, cmd, version, seq, attrs);
        // SAFETY: sockaddr_nl is plain data; zeroed (pid 0 = the kernel) is valid.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `kernel` are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let mut data = Vec::new();
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ETIMEDOUT)) {
                    return Err(GenlError::Timeout(self.timeout_ms));
                }
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e.into());
            }
            for reply in decode_replies(&buf[..n as usize], seq)? {
                match reply {
                    Reply::Data(d) => data.push(d),
                    Reply::Ack(0) | Reply::Done => return Ok(data),
                    Reply::Ack(err) => {
                        return Err(GenlError::Kernel(io::Error::from_raw_os_error(-err)))
                    }
                }
            }
        }
    }

    /// Resolves a family name to its id (`NoFamily` when not registered).
    pub fn resolve_family(&mut self, name: &str) -> Result<u16, GenlError> {
        let mut attrs = AttrBuf::new();
        attrs.put_str(CTRL_ATTR_FAMILY_NAME, name);
        let replies = match self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &attrs) {
            Ok(r) => r,
            Err(GenlError::Kernel(e)) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(GenlError::NoFamily(name.to_string()))
            }
            Err(e) => return Err(e),
        };
        for r in &replies {
            for (kind, payload) in parse_attrs(r)? {
                if kind == CTRL_ATTR_FAMILY_ID {
                    return u16_at(payload, 0).ok_or(GenlError::Malformed("family id"));
                }
            }
        }
        Err(GenlError::Malformed("no family id in the reply"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let mut socks = AttrBuf::new();
        let mut item = AttrBuf::new();
        item.put_u32(nbd::SOCK_FD, 7);
        socks.put_nested(nbd::SOCK_ITEM, &item);
        let mut a = AttrBuf::new();
        a.put_u64(nbd::ATTR_SIZE_BYTES, 1 << 20)
            .put_nested(nbd::ATTR_SOCKETS, &socks);
        let m = encode_request(0x22, nbd::CMD_CONNECT, 1, 9, &a);
        assert_eq!(u32_at(&m, 0), Some(m.len() as u32));
        assert_eq!(u16_at(&m, 4), Some(0x22));
        assert_eq!(u32_at(&m, 8), Some(9));
        assert_eq!(m[16], nbd::CMD_CONNECT);
        let attrs = parse_attrs(&m[20..]).unwrap_or_default();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0].0, nbd::ATTR_SIZE_BYTES);
        assert_eq!(attrs[0].1, &(1u64 << 20).to_ne_bytes());
        assert_eq!(attrs[1].0, nbd::ATTR_SOCKETS);
        let inner = parse_attrs(attrs[1].1).unwrap_or_default();
        assert_eq!(inner[0].0, nbd::SOCK_ITEM);
        let fd = parse_attrs(inner[0].1).unwrap_or_default();
        assert_eq!(attr_u32(fd[0].1).ok(), Some(7));
    }

    #[test]
    fn replies_and_errors() {
        // A data message then an ack, for seq 5; a stray message for seq 4 skipped.
        let mut a = AttrBuf::new();
        a.put_u32(nbd::ATTR_INDEX, 3);
        let mut dgram = encode_request(0x22, 1, 1, 4, &a);
        dgram.extend(encode_request(0x22, 1, 1, 5, &a));
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&5u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-libc::EBUSY).to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        dgram.extend(&ack);
        let r = decode_replies(&dgram, 5).unwrap_or_default();
        assert_eq!(r.len(), 2);
        assert!(matches!(&r[0], Reply::Data(d) if parse_attrs(d).map(|v| v.len()).ok() == Some(1)));
        assert_eq!(r[1], Reply::Ack(-libc::EBUSY));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for len in 0..64usize {
            let b: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = decode_replies(&b, 1);
            let _ = parse_attrs(&b);
        }
        let mut bad = vec![0u8; 16];
        bad[0] = 200; // length past the end
        assert!(decode_replies(&bad, 0).is_err());
        assert!(parse_attrs(&[3, 0, 1, 0]).is_err());
    }
}
