//! Socket options of replication connections (TCP_NODELAY, SO_SNDBUF, SO_RCVBUF).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use tokio::net::{TcpSocket, TcpStream};

fn clamp_buf(bytes: u64) -> u32 {
    bytes.min(i32::MAX as u64) as u32 // clamped to fit a C int
}

/// Dial `addr` with the buffer sizes set before connecting (so the window scale
/// matches), then TCP_NODELAY.
pub(crate) async fn dial(
    addr: SocketAddr,
    sndbuf_bytes: u64,
    rcvbuf_bytes: u64,
) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if sndbuf_bytes > 0 {
        sock.set_send_buffer_size(clamp_buf(sndbuf_bytes))?;
    }
    if rcvbuf_bytes > 0 {
        sock.set_recv_buffer_size(clamp_buf(rcvbuf_bytes))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Configure an accepted stream: TCP_NODELAY and the buffer sizes when non-zero.
pub(crate) fn configure_accepted(
    stream: &TcpStream,
    sndbuf_bytes: u64,
    rcvbuf_bytes: u64,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let fd = stream.as_raw_fd();
    for (opt, bytes) in [
        (libc::SO_SNDBUF, sndbuf_bytes),
        (libc::SO_RCVBUF, rcvbuf_bytes),
    ] {
        if bytes == 0 {
            continue;
        }
        let val = clamp_buf(bytes) as libc::c_int;
        // SAFETY: `fd` is the open socket owned by `stream`, which outlives this call;
        // the option value points to a live `c_int` and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&val as *const libc::c_int).cast::<libc::c_void>(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
