//! An in-memory [`BlockIo`]: a `Vec<u8>` behind a lock, for tests and the simulator.
//!
//! Every operation completes immediately; `flush` is a no-op (memory is "stable"),
//! discard and write_zeroes zero the range, and block_status reports all data.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use super::{BlockIo, IoError, IoFuture};

/// An in-memory disk.
#[derive(Debug)]
pub struct MemDisk {
    data: RwLock<Vec<u8>>,
    size_bytes: u64,
}

impl MemDisk {
    /// A zero-filled disk of `size_bytes`.
    pub fn new(size_bytes: usize) -> MemDisk {
        MemDisk::from_vec(vec![0u8; size_bytes])
    }

    /// A disk holding `data`.
    pub fn from_vec(data: Vec<u8>) -> MemDisk {
        let size_bytes = data.len() as u64;
        MemDisk {
            data: RwLock::new(data),
            size_bytes,
        }
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.read_lock().clone()
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        // A poisoned lock only means a panic elsewhere; the bytes are still valid.
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|p| p.into_inner())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), IoError> {
        IoError::check_range(offset, len, self.size_bytes)?;
        let (o, l) = (offset as usize, len as usize);
        self.write_lock()[o..o + l].fill(0);
        Ok(())
    }
}

impl BlockIo for MemDisk {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, Vec<u8>> {
        let r = IoError::check_range(offset, len as u64, self.size_bytes).map(|()| {
            let o = offset as usize;
            self.read_lock()[o..o + len].to_vec()
        });
        Box::pin(async move { r })
    }

    fn write_at(&self, offset: u64, data: Bytes, _fua: bool) -> IoFuture<'_, ()> {
        let r = IoError::check_range(offset, data.len() as u64, self.size_bytes).map(|()| {
            let o = offset as usize;
            self.write_lock()[o..o + data.len()].copy_from_slice(&data);
        });
        Box::pin(async move { r })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        let r = self.zero(offset, len);
        Box::pin(async move { r })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        let r = self.zero(offset, len);
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mem_disk_roundtrip() {
        let d = MemDisk::new(8192);
        d.write_at(100, Bytes::from_static(b"abc"), false)
            .await
            .unwrap();
        assert_eq!(d.read_at(99, 5).await.unwrap(), b"\0abc\0");
        d.write_zeroes(101, 1, false).await.unwrap();
        assert_eq!(d.read_at(100, 3).await.unwrap(), b"a\0c");
        d.discard(100, 3).await.unwrap();
        assert_eq!(d.read_at(100, 3).await.unwrap(), b"\0\0\0");
        assert!(matches!(
            d.read_at(8190, 3).await,
            Err(IoError::OutOfRange { .. })
        ));
        assert!(d
            .write_at(8192, Bytes::from_static(b"x"), false)
            .await
            .is_err());
        let st = d.block_status(0, 8192).await.unwrap();
        assert_eq!(st.len(), 1);
        assert!(!st[0].hole);
        d.flush().await.unwrap();
    }
}
