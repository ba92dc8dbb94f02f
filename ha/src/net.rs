//! Network edges of `rdb-ha`: interface lookup, heartbeat UDP sockets (one per
//! interface, bound to it with `SO_BINDTODEVICE`), and gratuitous ARP with an
//! `AF_PACKET` raw socket.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};

use crate::config::Medium;

/// Errors of the network edge.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The interface does not exist or has no IPv4 address.
    #[error("interface {0}: not found or no IPv4 address")]
    NoIface(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was attempted.
        what: String,
        /// The OS error.
        source: io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Sys { what, source }
}

/// IPv4 configuration of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceAddr {
    /// Interface name.
    pub name: String,
    /// Address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl IfaceAddr {
    /// Directed broadcast address of the network.
    pub fn broadcast(&self) -> Ipv4Addr {
        let mask = prefix_mask(self.prefix);
        Ipv4Addr::from(u32::from(self.addr) | !mask)
    }

    /// True when `ip` is in this interface's network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = prefix_mask(self.prefix);
        u32::from(self.addr) & mask == u32::from(ip) & mask
    }
}

fn prefix_mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

/// Every IPv4 address of every interface.
pub fn ipv4_addrs() -> Result<Vec<IfaceAddr>, NetError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own and free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(sys("getifaddrs")(io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a non-null node of the list returned by getifaddrs, alive until
        // freeifaddrs; its fields are valid per getifaddrs(3).
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr of at least sa_family.
        let family = unsafe { (*ifa.ifa_addr).sa_family };
        if i32::from(family) != libc::AF_INET {
            continue;
        }
        // SAFETY: family is AF_INET, so ifa_addr points to a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        let prefix = if ifa.ifa_netmask.is_null() {
            32
        } else {
            // SAFETY: netmask of an AF_INET address is a sockaddr_in.
            let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
            u32::from_be(m.sin_addr.s_addr).leading_ones() as u8 // <= 32
        };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        out.push(IfaceAddr { name, addr, prefix });
    }
    // SAFETY: head came from getifaddrs and is freed once; no reference outlives it.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// First IPv4 address of `iface`.
pub fn iface_addr(iface: &str) -> Result<IfaceAddr, NetError> {
    ipv4_addrs()?
        .into_iter()
        .find(|a| a.name == iface)
        .ok_or_else(|| NetError::NoIface(iface.to_owned()))
}

fn setsockopt_int(fd: i32, level: i32, opt: i32, v: i32, what: &str) -> Result<(), NetError> {
    // SAFETY: fd is an open socket; the option value is a valid c_int of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(sys(what)(io::Error::last_os_error()));
    }
    Ok(())
}

/// One heartbeat link: a UDP socket bound to `0.0.0.0:port` on one interface, and the
/// destinations of every medium on that interface.
#[derive(Debug)]
pub struct LinkSocket {
    /// Interface name (the link's name).
    pub iface: String,
    /// The socket (blocking mode is set by the caller).
    pub socket: UdpSocket,
    /// Where heartbeats are sent.
    pub targets: Vec<SocketAddrV4>,
}

/// Opens one socket per interface named by `media`, bound to `port` with
/// `SO_BINDTODEVICE`, `SO_REUSEADDR` and `SO_BROADCAST`, multicast groups joined.
pub fn open_links(media: &[Medium], port: u16) -> Result<Vec<LinkSocket>, NetError> {
    let mut links: Vec<LinkSocket> = Vec::new();
    for m in media {
        let iface = m.iface().to_owned();
        let idx = match links.iter().position(|l| l.iface == iface) {
            Some(i) => i,
            None => {
                links.push(LinkSocket {
                    socket: bound_socket(&iface, port)?,
                    iface: iface.clone(),
                    targets: Vec::new(),
                });
                links.len() - 1
            }
        };
        let link = &mut links[idx];
        match m {
            Medium::Bcast { .. } => {
                let a = iface_addr(&iface)?;
                link.targets.push(SocketAddrV4::new(a.broadcast(), port));
            }
            Medium::Ucast { ip, port, .. } => link.targets.push(SocketAddrV4::new(*ip, *port)),
            Medium::Mcast {
                group,
                port: mport,
                ttl,
                loopback,
                ..
            } => {
                let a = iface_addr(&iface)?;
                let s = &link.socket;
                s.join_multicast_v4(group, &a.addr)
                    .map_err(sys(format!("join {group} on {iface}")))?;
                s.set_multicast_ttl_v4(u32::from(*ttl))
                    .map_err(sys("IP_MULTICAST_TTL"))?;
                s.set_multicast_loop_v4(*loopback)
                    .map_err(sys("IP_MULTICAST_LOOP"))?;
                link.targets.push(SocketAddrV4::new(*group, *mport));
            }
        }
    }
    Ok(links)
}

fn bound_socket(iface: &str, port: u16) -> Result<UdpSocket, NetError> {
    // SAFETY: plain socket(2) call; the result is checked and wrapped in an OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys("socket")(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_BROADCAST, 1, "SO_BROADCAST")?;
    let name = iface.as_bytes();
    // SAFETY: the option value is the interface name bytes with their length.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(sys(format!("SO_BINDTODEVICE {iface}"))(
            io::Error::last_os_error(),
        ));
    }
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: sa is a valid sockaddr_in and its size is passed.
    let r = unsafe {
        libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(sys(format!("bind 0.0.0.0:{port} on {iface}"))(
            io::Error::last_os_error(),
        ));
    }
    Ok(UdpSocket::from(owned))
}

/// Ethernet ARP frame announcing `ip` at `mac` (gratuitous ARP request: sender and
/// target protocol address are both `ip`).
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    f[32..38].copy_from_slice(&[0xff; 6]);
    f[38..42].copy_from_slice(&ip.octets());
    f
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// True when the interface does not do ARP (loopback, `NOARP` interfaces).
pub fn iface_noarp(iface: &str) -> Result<bool, NetError> {
    let flags = std::fs::read_to_string(format!("/sys/class/net/{iface}/flags"))
        .map_err(sys(format!("flags of {iface}")))?;
    let v = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16)
        .map_err(|_| NetError::NoIface(iface.to_owned()))?;
    Ok(v & (libc::IFF_NOARP | libc::IFF_LOOPBACK) as u32 != 0)
}

/// Sends `count` gratuitous ARP frames for `ip` on `iface` with an `AF_PACKET` socket.
pub fn send_garp(iface: &str, ip: Ipv4Addr, count: u32) -> Result<(), NetError> {
    let mac_s = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
        .map_err(sys(format!("MAC of {iface}")))?;
    let mac = parse_mac(&mac_s).ok_or_else(|| NetError::NoIface(iface.to_owned()))?;
    let cname = std::ffi::CString::new(iface).map_err(|_| NetError::NoIface(iface.to_owned()))?;
    // SAFETY: cname is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(NetError::NoIface(iface.to_owned()));
    }
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked and wrapped in an OwnedFd.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(sys("AF_PACKET socket")(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket owned by nobody else; dropped at return.
    let _owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let frame = garp_frame(mac, ip);
    for _ in 0..count {
        // SAFETY: frame and sll are valid for the lengths passed.
        let r = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(sys(format!("send gratuitous ARP on {iface}"))(
                io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_frame_layout() {
        let f = garp_frame([2, 0, 0, 0, 0, 1], Ipv4Addr::new(192, 168, 10, 13));
        let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ffffffffffff020000000001080600010800060400010200000000\
             01c0a80a0dffffffffffffc0a80a0d"
        );
    }

    #[test]
    fn iface_math_and_lookup() {
        let a = IfaceAddr {
            name: "eth0".into(),
            addr: Ipv4Addr::new(192, 168, 10, 9),
            prefix: 29,
        };
        assert_eq!(a.broadcast(), Ipv4Addr::new(192, 168, 10, 15));
        assert!(a.contains(Ipv4Addr::new(192, 168, 10, 13)));
        assert!(!a.contains(Ipv4Addr::new(192, 168, 10, 17)));
        let lo = iface_addr("lo").unwrap();
        assert_eq!(lo.addr, Ipv4Addr::LOCALHOST);
        assert!(iface_noarp("lo").unwrap());
        assert_eq!(parse_mac("02:00:00:00:00:0a\n"), Some([2, 0, 0, 0, 0, 10]));
    }

    #[test]
    fn link_sockets_on_lo_exchange() {
        let m1 = [Medium::Ucast {
            iface: "lo".into(),
            ip: Ipv4Addr::LOCALHOST,
            port: 47_912,
        }];
        let a = open_links(&m1, 47_911).unwrap();
        let b = open_links(&[], 47_912).unwrap();
        assert!(b.is_empty());
        let b = bound_socket("lo", 47_912).unwrap();
        a[0].socket.send_to(b"ping", a[0].targets[0]).unwrap();
        let mut buf = [0u8; 16];
        b.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let (n, from) = b.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(from.port(), 47_911);
    }
}
