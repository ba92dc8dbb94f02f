//! Health check probes (command, TCP connect, HTTP GET) and the ping tie-breaker
//! (ICMP echo over an `IPPROTO_ICMP` datagram socket). Each probe is one bounded attempt;
//! the fall/rise hysteresis lives in the state machine.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::CheckKind;

/// One probe of `kind` within `timeout_ms`; true when healthy.
pub async fn probe(kind: &CheckKind, timeout_ms: u64) -> bool {
    let t = Duration::from_millis(timeout_ms);
    let fut = async {
        match kind {
            CheckKind::Cmd(cmd) => tokio::process::Command::new("sh")
                .args(["-c", cmd])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .is_ok_and(|s| s.success()),
            CheckKind::Tcp(addr) => TcpStream::connect(addr.as_str()).await.is_ok(),
            CheckKind::Http(url) => http_ok(url).await,
        }
    };
    tokio::time::timeout(t, fut).await.unwrap_or(false)
}

async fn http_ok(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    let Ok(mut s) = TcpStream::connect(addr.as_str()).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\nUser-Agent: rdb-ha\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let code = head.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok());
    matches!(code, Some(200..=399))
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16) // folded to 16 bits above
}

/// One ICMP echo to `host`; true when a reply arrives within `timeout_ms`. Uses an
/// unprivileged ICMP datagram socket when `ping_group_range` allows, else a raw socket
/// (root). Blocking: call from `spawn_blocking`.
pub fn ping_once(host: Ipv4Addr, timeout_ms: u64) -> bool {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut raw = false;
    // SAFETY: plain socket(2) call; the result is checked below.
    let mut fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        raw = true;
        // SAFETY: as above.
        fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
    }
    if fd < 0 {
        return false;
    }
    // SAFETY: fd is a fresh socket owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let sock = std::net::UdpSocket::from(owned);
    let deadline = std::time::Instant::now() + Duration::from_millis(timeout_ms);
    let id: u16 = rand::random();
    let seq: u16 = rand::random();
    let mut pkt = [0u8; 16];
    pkt[0] = 8; // echo request
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    pkt[8..16].copy_from_slice(b"rdb-ha!!");
    let c = checksum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    if sock.send_to(&pkt, SocketAddrV4::new(host, 0)).is_err() {
        return false;
    }
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            return false;
        };
        if from.ip() != std::net::IpAddr::V4(host) {
            continue;
        }
        // A raw socket delivers the IP header first.
        let off = if raw {
            usize::from(buf[0] & 0x0f) * 4
        } else {
            0
        };
        let Some(icmp) = buf.get(off..n) else {
            continue;
        };
        // Datagram sockets rewrite the identifier; only the sequence is ours then.
        if icmp.len() >= 8
            && icmp[0] == 0
            && icmp[6..8] == seq.to_be_bytes()
            && (!raw || icmp[4..6] == id.to_be_bytes())
        {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes() {
        assert!(probe(&CheckKind::Cmd("true".into()), 2000).await);
        assert!(!probe(&CheckKind::Cmd("exit 1".into()), 2000).await);
        assert!(!probe(&CheckKind::Cmd("sleep 5".into()), 100).await);
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taddr = tcp.local_addr().unwrap();
        assert!(probe(&CheckKind::Tcp(taddr.to_string()), 2000).await);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                s.write_all(format!("HTTP/1.0 {status}\r\n\r\nx").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let url = format!("http://{addr}/health");
        assert!(probe(&CheckKind::Http(url.clone()), 2000).await);
        assert!(!probe(&CheckKind::Http(url), 2000).await);
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(!probe(&CheckKind::Tcp(closed.to_string()), 2000).await);
    }

    #[test]
    fn ping_loopback_and_unreachable() {
        assert!(
            ping_once(Ipv4Addr::LOCALHOST, 1000),
            "ICMP echo to 127.0.0.1 failed (needs root or ping_group_range)"
        );
        // Class E is never routed: no reply (or a send error).
        assert!(!ping_once(Ipv4Addr::new(240, 0, 0, 1), 200));
    }
}
