//! Block digests for online verify (`verify-alg`) and checksum-based resync
//! (`csums-alg`): the algorithms DRBD users name, computed over a chunk of data.
//!
//! Owns the mapping from a configured name (`sha1`, `sha256`, `md5`, `crc32c`, also
//! in the kernel crypto spelling `hmac(...)`-free form) to a digest function.

use rdb_protocol::repl::Digest;
use sha2::Digest as _;

/// A block digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockDigest {
    /// CRC-32C (Castagnoli), 4 bytes: fast, detects corruption, not tampering.
    Crc32c,
    /// MD5, 16 bytes.
    Md5,
    /// SHA-1, 20 bytes.
    Sha1,
    /// SHA-256, 32 bytes.
    Sha256,
}

impl BlockDigest {
    /// Parses a DRBD algorithm name.
    pub fn parse(name: &str) -> Result<BlockDigest, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "crc32c" => Ok(BlockDigest::Crc32c),
            "md5" => Ok(BlockDigest::Md5),
            "sha1" => Ok(BlockDigest::Sha1),
            "sha256" => Ok(BlockDigest::Sha256),
            other => Err(format!(
                "digest algorithm {other:?} is not supported (use crc32c, md5, sha1 or sha256)"
            )),
        }
    }

    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> Digest {
        let bytes: Vec<u8> = match self {
            BlockDigest::Crc32c => crc32c(data).to_be_bytes().to_vec(),
            BlockDigest::Md5 => md5::Md5::digest(data).to_vec(),
            BlockDigest::Sha1 => sha1::Sha1::digest(data).to_vec(),
            BlockDigest::Sha256 => sha2::Sha256::digest(data).to_vec(),
        };
        // Every digest above is at most 32 bytes, below MAX_DIGEST_BYTES (64).
        Digest::new(&bytes).unwrap_or(Digest::EMPTY)
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table driven.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // RFC 3720 test vector: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(BlockDigest::parse("SHA1").unwrap().digest(b"abc").len(), 20);
        assert_eq!(
            BlockDigest::parse("sha256").unwrap().digest(b"abc").len(),
            32
        );
        assert!(BlockDigest::parse("whirlpool").is_err());
    }
}
