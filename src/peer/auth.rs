//! Peer authentication: cram-hmac-alg style challenge/response (HMAC over a nonce).
//!
//! Each side sends a random 32-byte nonce; the other answers with
//! `HMAC(secret, "rdb-auth-v1\0" || nonce || responder_node_name || "\0" || resource)`.
//! Binding the responder's name into the MAC defeats reflecting a challenge back to
//! its sender. Verification is constant time (`Mac::verify_slice`). The secret itself
//! never leaves this module.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use rdb_protocol::repl::Digest;

/// Domain separation prefix of every authenticated message.
const AUTH_CONTEXT: &[u8] = b"rdb-auth-v1\0";

/// A supported cram-hmac-alg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacAlg {
    /// HMAC-SHA1.
    Sha1,
    /// HMAC-SHA256.
    Sha256,
    /// HMAC-SHA512.
    Sha512,
    /// HMAC-MD5.
    Md5,
}

impl HmacAlg {
    /// Parse a DRBD cram-hmac-alg name: `sha256`, `hmac(sha256)`, `sha1`, `sha512`, `md5`
    /// (case-insensitive).
    pub fn parse(name: &str) -> Option<HmacAlg> {
        let n = name.trim().to_ascii_lowercase();
        let inner = n
            .strip_prefix("hmac(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or(&n);
        match inner {
            "sha1" => Some(HmacAlg::Sha1),
            "sha256" => Some(HmacAlg::Sha256),
            "sha512" => Some(HmacAlg::Sha512),
            "md5" => Some(HmacAlg::Md5),
            _ => None,
        }
    }
}

/// A configured secret with its algorithm. `Debug` never prints the secret.
#[derive(Clone)]
pub(crate) struct Authenticator {
    alg: HmacAlg,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Authenticator({:?}, <secret>)", self.alg)
    }
}

fn keyed<M: Mac + KeyInit>(secret: &[u8], parts: &[&[u8]]) -> Option<M> {
    // HMAC accepts keys of any length, so this never returns None in practice.
    let mut m = <M as KeyInit>::new_from_slice(secret).ok()?;
    for p in parts {
        m.update(p);
    }
    Some(m)
}

fn tag<M: Mac + KeyInit>(secret: &[u8], parts: &[&[u8]]) -> Option<Digest> {
    Digest::new(&keyed::<M>(secret, parts)?.finalize().into_bytes())
}

fn check<M: Mac + KeyInit>(secret: &[u8], parts: &[&[u8]], mac: &[u8]) -> bool {
    keyed::<M>(secret, parts).is_some_and(|m| m.verify_slice(mac).is_ok())
}

impl Authenticator {
    pub(crate) fn new(alg: HmacAlg, secret: Vec<u8>) -> Self {
        Authenticator { alg, secret }
    }

    fn parts<'a>(nonce: &'a [u8; 32], responder: &'a str, resource: &'a str) -> [&'a [u8]; 5] {
        [
            AUTH_CONTEXT,
            nonce,
            responder.as_bytes(),
            b"\0",
            resource.as_bytes(),
        ]
    }

    /// Our answer to the peer's `nonce`; `None` only if the HMAC cannot be keyed.
    pub(crate) fn respond(
        &self,
        nonce: &[u8; 32],
        responder: &str,
        resource: &str,
    ) -> Option<Digest> {
        let p = Self::parts(nonce, responder, resource);
        match self.alg {
            HmacAlg::Sha1 => tag::<Hmac<sha1::Sha1>>(&self.secret, &p),
            HmacAlg::Sha256 => tag::<Hmac<sha2::Sha256>>(&self.secret, &p),
            HmacAlg::Sha512 => tag::<Hmac<sha2::Sha512>>(&self.secret, &p),
            HmacAlg::Md5 => tag::<Hmac<md5::Md5>>(&self.secret, &p),
        }
    }

    /// Constant-time check of the peer's answer to our `nonce`.
    pub(crate) fn verify(
        &self,
        nonce: &[u8; 32],
        responder: &str,
        resource: &str,
        mac: &[u8],
    ) -> bool {
        let p = Self::parts(nonce, responder, resource);
        match self.alg {
            HmacAlg::Sha1 => check::<Hmac<sha1::Sha1>>(&self.secret, &p, mac),
            HmacAlg::Sha256 => check::<Hmac<sha2::Sha256>>(&self.secret, &p, mac),
            HmacAlg::Sha512 => check::<Hmac<sha2::Sha512>>(&self.secret, &p, mac),
            HmacAlg::Md5 => check::<Hmac<md5::Md5>>(&self.secret, &p, mac),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alg_names() {
        assert_eq!(HmacAlg::parse("sha256"), Some(HmacAlg::Sha256));
        assert_eq!(HmacAlg::parse("hmac(sha1)"), Some(HmacAlg::Sha1));
        assert_eq!(HmacAlg::parse("HMAC(MD5)"), Some(HmacAlg::Md5));
        assert_eq!(HmacAlg::parse("sha512"), Some(HmacAlg::Sha512));
        assert_eq!(HmacAlg::parse("crc32c"), None);
    }

    #[test]
    fn respond_verify() {
        let nonce = [7u8; 32];
        for alg in [
            HmacAlg::Sha1,
            HmacAlg::Sha256,
            HmacAlg::Sha512,
            HmacAlg::Md5,
        ] {
            let a = Authenticator::new(alg, b"secret".to_vec());
            let b = Authenticator::new(alg, b"Secret".to_vec());
            let mac = a.respond(&nonce, "n1", "r0").unwrap();
            assert!(a.verify(&nonce, "n1", "r0", mac.as_slice()));
            assert!(!b.verify(&nonce, "n1", "r0", mac.as_slice()));
            assert!(!a.verify(&nonce, "n2", "r0", mac.as_slice()));
            assert!(!a.verify(&[8u8; 32], "n1", "r0", mac.as_slice()));
            assert!(!a.verify(&nonce, "n1", "r0", &mac.as_slice()[1..]));
        }
        // Known answer: HMAC-SHA256 of the documented message layout.
        let a = Authenticator::new(HmacAlg::Sha256, b"k".to_vec());
        let mac = a.respond(&[0u8; 32], "a", "r").unwrap();
        let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"k").unwrap();
        let mut msg = b"rdb-auth-v1\0".to_vec();
        msg.extend_from_slice(&[0u8; 32]);
        msg.extend_from_slice(b"a\0r");
        m.update(&msg);
        assert_eq!(mac.as_slice(), m.finalize().into_bytes().as_slice());
    }
}
