//! Shared helpers of the NBD tests: a file-backed `BlockIo`, a map resolver, an
//! in-process server on a temporary unix socket, and child-process clients with
//! deadlines (a missing client binary fails the test with a clear message).
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdb::frontend::nbd::{ExportInfo, ExportLookup, ExportResolver, NbdLimits, NbdServer};
use rdb::storage::{BlockIo, Extent, IoError, IoFuture};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A file-backed device: positioned reads and writes on tokio's blocking pool,
/// holes punched with fallocate, allocation reported with SEEK_DATA/SEEK_HOLE.
pub struct FileDev {
    file: Arc<File>,
    size_bytes: u64,
    multi_conn: bool,
    /// Do the I/O on the calling task instead of the blocking pool (perf comparison).
    inline: bool,
}

impl FileDev {
    pub fn open(path: &Path) -> Arc<FileDev> {
        Self::open_with(path, true)
    }

    pub fn open_with(path: &Path, multi_conn: bool) -> Arc<FileDev> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let size_bytes = file.metadata().unwrap().len();
        Arc::new(FileDev {
            file: Arc::new(file),
            size_bytes,
            multi_conn,
            inline: false,
        })
    }

    /// A device that does its pread/pwrite on the calling task (blocks a worker).
    pub fn open_inline(path: &Path) -> Arc<FileDev> {
        let mut dev = Self::open(path);
        if let Some(d) = Arc::get_mut(&mut dev) {
            d.inline = true;
        }
        dev
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, IoError> {
        let file = Arc::clone(&self.file);
        if self.inline {
            return f(&file).map_err(IoError::Io);
        }
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(r) => r.map_err(IoError::Io),
            Err(e) => Err(IoError::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an fd owned by `file`, which outlives the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn lseek(file: &File, offset: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an fd owned by `file`, which outlives the call.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

impl BlockIo for FileDev {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, Vec<u8>> {
        Box::pin(async move {
            IoError::check_range(offset, len as u64, self.size_bytes)?;
            self.blocking(move |f| {
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            })
            .await
        })
    }

    fn write_at(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            IoError::check_range(offset, data.len() as u64, self.size_bytes)?;
            self.blocking(move |f| {
                f.write_all_at(&data, offset)?;
                if fua {
                    f.sync_data()?;
                }
                Ok(())
            })
            .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.blocking(|f| f.sync_data()).await })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            IoError::check_range(offset, len, self.size_bytes)?;
            self.blocking(move |f| {
                fallocate(
                    f,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
            })
            .await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            IoError::check_range(offset, len, self.size_bytes)?;
            self.blocking(move |f| {
                let mode = if may_unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                match fallocate(f, mode, offset, len) {
                    Ok(()) => Ok(()),
                    Err(_) => {
                        let zeroes = vec![0u8; 1 << 20];
                        let mut pos = offset;
                        while pos < offset + len {
                            let n = (offset + len - pos).min(zeroes.len() as u64) as usize;
                            f.write_all_at(&zeroes[..n], pos)?;
                            pos += n as u64;
                        }
                        Ok(())
                    }
                }
            })
            .await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            IoError::check_range(offset, len, self.size_bytes)?;
            self.blocking(move |f| {
                let end = offset + len;
                let mut pos = offset;
                let mut extents = Vec::new();
                while pos < end {
                    let data = lseek(f, pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
                    if data > pos {
                        extents.push(Extent {
                            len_bytes: data - pos,
                            hole: true,
                            zero: true,
                        });
                        pos = data;
                        continue;
                    }
                    let hole = lseek(f, pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
                    extents.push(Extent {
                        len_bytes: hole - pos,
                        hole: false,
                        zero: false,
                    });
                    pos = hole;
                }
                Ok(extents)
            })
            .await
        })
    }

    fn flush_covers_all_handles(&self) -> bool {
        self.multi_conn
    }
}

/// Exports from a map; `refused` names answer with a policy refusal.
#[derive(Default)]
pub struct MapResolver {
    pub exports: BTreeMap<String, ExportInfo>,
    pub refused: BTreeMap<String, String>,
}

impl MapResolver {
    pub fn with_export(
        mut self,
        name: &str,
        description: &str,
        device: Arc<dyn BlockIo>,
        read_only: bool,
    ) -> Self {
        self.exports.insert(
            name.to_string(),
            ExportInfo {
                name: name.to_string(),
                description: description.to_string(),
                device,
                read_only,
            },
        );
        self
    }

    pub fn with_refused(mut self, name: &str, message: &str) -> Self {
        self.refused.insert(name.to_string(), message.to_string());
        self
    }
}

impl ExportResolver for MapResolver {
    fn list(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }

    fn lookup(&self, name: &str) -> ExportLookup {
        if let Some(message) = self.refused.get(name) {
            return ExportLookup::Refused {
                message: message.clone(),
            };
        }
        match self.exports.get(name) {
            Some(info) => ExportLookup::Found(info.clone()),
            None => ExportLookup::Unknown,
        }
    }
}

/// A server running in-process on a unix socket in a temporary directory.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub server: Arc<NbdServer>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub fn start(resolver: MapResolver) -> TestServer {
        Self::start_with(resolver, NbdLimits::default())
    }

    pub fn start_with(resolver: MapResolver, limits: NbdLimits) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = Arc::new(NbdServer::new(Arc::new(resolver), limits));
        let (shutdown, rx) = watch::channel(false);
        let s = Arc::clone(&server);
        let task = tokio::spawn(async move { s.serve_unix(listener, rx).await });
        TestServer {
            dir,
            socket,
            server,
            shutdown,
            task,
        }
    }

    /// `nbd+unix:///NAME?socket=PATH`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Requests shutdown and waits (with a deadline) for `serve_unix` to return.
    pub async fn stop(self) {
        self.shutdown.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server did not shut down within 10 s")
            .unwrap()
            .unwrap();
    }
}

/// Creates a file of `size_bytes` filled with random bytes; returns its content.
pub fn random_file(path: &Path, size_bytes: usize) -> Vec<u8> {
    let mut data = vec![0u8; size_bytes];
    rand::Rng::fill(&mut rand::rng(), &mut data[..]);
    std::fs::write(path, &data).unwrap();
    data
}

/// Creates a sparse file of `size_bytes`.
pub fn sparse_file(path: &Path, size_bytes: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size_bytes).unwrap();
}

/// Runs a client binary with a deadline; panics clearly if it is missing.
pub async fn run(program: &str, args: &[&str], timeout: Duration) -> Output {
    run_env(program, args, &[], timeout).await
}

/// Like [`run`], with extra environment variables.
pub async fn run_env(
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("required client binary `{program}` is not installed (needed by this test)")
        }
        Err(e) => panic!("cannot start `{program}`: {e}"),
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => output.unwrap(),
        Err(_) => panic!(
            "`{program} {}` did not finish within {timeout:?}",
            args.join(" ")
        ),
    }
}

/// Runs a client and asserts success, returning stdout.
pub async fn run_ok(program: &str, args: &[&str], timeout: Duration) -> String {
    let out = run(program, args, timeout).await;
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a python script under Debian's python (which has the libnbd bindings).
pub async fn run_python(script: &str, args: &[&str], timeout: Duration) -> String {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    let out = run("/usr/bin/python3", &all, timeout).await;
    assert!(
        out.status.success(),
        "python script failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
