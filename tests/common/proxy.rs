//! A user-space TCP proxy for fault tests (there is no tc netem here): it forwards
//! between a listening port and a target and can stall either direction, delay it,
//! or cut every connection (and refuse new ones) until healed. Bounded: its threads
//! poll a shutdown flag every 20 ms and stop when the proxy is dropped.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Traffic direction through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the side that connected to the proxy towards the target.
    ToTarget,
    /// From the target back to the side that connected.
    FromTarget,
}

#[derive(Default)]
struct Ctl {
    stall_to_target: AtomicBool,
    stall_from_target: AtomicBool,
    delay_ms: AtomicU64,
    cut: AtomicBool,
    shutdown: AtomicBool,
    streams: Mutex<Vec<TcpStream>>,
    bytes_to_target: AtomicU64,
    bytes_from_target: AtomicU64,
}

/// A running proxy.
pub struct Proxy {
    /// The address it listens on.
    pub addr: SocketAddr,
    ctl: Arc<Ctl>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `listen` (port 0 picks one) and forwards to `target`.
    pub fn start(listen: &str, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(listen).expect("proxy bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy addr");
        let ctl = Arc::new(Ctl::default());
        let c = ctl.clone();
        let accept = std::thread::spawn(move || {
            while !c.shutdown.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if c.cut.load(Ordering::Relaxed) {
                            drop(client);
                            continue;
                        }
                        let Ok(server) =
                            TcpStream::connect_timeout(&target, Duration::from_secs(2))
                        else {
                            continue;
                        };
                        let _ = client.set_nonblocking(false);
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        if let (Ok(c1), Ok(s1)) = (client.try_clone(), server.try_clone()) {
                            if let Ok(mut list) = c.streams.lock() {
                                list.push(c1);
                                list.push(s1);
                            }
                        }
                        spawn_pump(c.clone(), &client, &server, Dir::ToTarget);
                        spawn_pump(c.clone(), &server, &client, Dir::FromTarget);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Proxy {
            addr,
            ctl,
            accept: Some(accept),
        }
    }

    /// Stops (or resumes) forwarding in one direction; data queues up meanwhile.
    pub fn stall(&self, dir: Dir, on: bool) {
        match dir {
            Dir::ToTarget => self.ctl.stall_to_target.store(on, Ordering::SeqCst),
            Dir::FromTarget => self.ctl.stall_from_target.store(on, Ordering::SeqCst),
        }
    }

    /// Adds a delay before each forwarded chunk.
    pub fn delay(&self, ms: u64) {
        self.ctl.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Closes every connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.ctl.cut.store(true, Ordering::SeqCst);
        if let Ok(mut list) = self.ctl.streams.lock() {
            for s in list.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Accepts connections again and clears stalls and delay.
    pub fn heal(&self) {
        self.ctl.cut.store(false, Ordering::SeqCst);
        self.stall(Dir::ToTarget, false);
        self.stall(Dir::FromTarget, false);
        self.delay(0);
    }

    /// Bytes forwarded in a direction so far.
    pub fn bytes(&self, dir: Dir) -> u64 {
        match dir {
            Dir::ToTarget => self.ctl.bytes_to_target.load(Ordering::Relaxed),
            Dir::FromTarget => self.ctl.bytes_from_target.load(Ordering::Relaxed),
        }
    }
}

fn spawn_pump(ctl: Arc<Ctl>, from: &TcpStream, to: &TcpStream, dir: Dir) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if ctl.shutdown.load(Ordering::Relaxed) || ctl.cut.load(Ordering::Relaxed) {
                break;
            }
            let stalled = match dir {
                Dir::ToTarget => ctl.stall_to_target.load(Ordering::Relaxed),
                Dir::FromTarget => ctl.stall_from_target.load(Ordering::Relaxed),
            };
            if stalled {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(_) => break,
            };
            // A stall set while this read was in progress holds what it returned.
            while match dir {
                Dir::ToTarget => ctl.stall_to_target.load(Ordering::Relaxed),
                Dir::FromTarget => ctl.stall_from_target.load(Ordering::Relaxed),
            } {
                if ctl.shutdown.load(Ordering::Relaxed) || ctl.cut.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let delay = ctl.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            match dir {
                Dir::ToTarget => ctl.bytes_to_target.fetch_add(n as u64, Ordering::Relaxed),
                Dir::FromTarget => ctl.bytes_from_target.fetch_add(n as u64, Ordering::Relaxed),
            };
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.ctl.shutdown.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
