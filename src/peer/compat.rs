//! The net settings both nodes of a connection must agree on, and the check DRBD's
//! `receive_protocol` makes on them: `protocol`, `after-sb-0pri`, `after-sb-1pri`,
//! `after-sb-2pri`, `allow-two-primaries`, `data-integrity-alg`. Each side sends its
//! own in a `NetSettings` frame at the end of the handshake and refuses the
//! connection with DRBD's text (`incompatible after-sb-0pri settings`) when the
//! peer's differ. `discard-local` on one side matches `discard-remote` on the other
//! (both name the same victim), as in DRBD's `convert_after_sb`.

use rdb_protocol::repl::{Frame, NET_ALLOW_TWO_PRIMARIES};

use super::{PeerError, PeerFrame};
use crate::config::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, Protocol};

/// The settings compared at connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetCompat {
    /// `protocol`.
    pub protocol: Protocol,
    /// `after-sb-0pri`.
    pub after_sb_0pri: AfterSb0Pri,
    /// `after-sb-1pri`.
    pub after_sb_1pri: AfterSb1Pri,
    /// `after-sb-2pri`.
    pub after_sb_2pri: AfterSb2Pri,
    /// `allow-two-primaries`.
    pub allow_two_primaries: bool,
    /// `data-integrity-alg`.
    pub integrity_alg: Option<String>,
}

impl Default for NetCompat {
    /// DRBD 8.4's defaults.
    fn default() -> NetCompat {
        NetCompat {
            protocol: Protocol::C,
            after_sb_0pri: AfterSb0Pri::Disconnect,
            after_sb_1pri: AfterSb1Pri::Disconnect,
            after_sb_2pri: AfterSb2Pri::Disconnect,
            allow_two_primaries: false,
            integrity_alg: None,
        }
    }
}

/// Index of `v` in a keyword list (the wire code).
fn code_of<T: PartialEq + Copy>(all: &[(&'static str, T)], v: T) -> u8 {
    // The lists have fewer than 256 entries (a handful each).
    all.iter().position(|&(_, x)| x == v).unwrap_or(0) as u8
}

/// The keyword of a wire code, or a description of an unknown one.
fn name_of<T: Copy>(all: &[(&'static str, T)], code: u8) -> (Option<T>, String) {
    match all.get(usize::from(code)) {
        Some(&(s, v)) => (Some(v), s.to_owned()),
        None => (None, format!("unknown code {code}")),
    }
}

fn incompatible(setting: &'static str, ours: &str, peer: &str) -> PeerError {
    PeerError::Incompatible {
        setting,
        detail: format!("ours {ours}, peer {peer}"),
    }
}

/// Compares our keyword setting with the peer's wire code, seen from our side by
/// `convert`; the error names both keywords (ours as in our configuration).
fn check_keyword<T: PartialEq + Copy>(
    setting: &'static str,
    all: &[(&'static str, T)],
    ours: T,
    peer_code: u8,
    convert: fn(T) -> T,
) -> Result<(), PeerError> {
    let (peer, peer_name) = name_of(all, peer_code);
    if peer.map(convert) == Some(ours) {
        return Ok(());
    }
    let ours_name = all
        .iter()
        .find(|&&(_, v)| v == ours)
        .map_or("unknown", |&(s, _)| s);
    Err(incompatible(setting, ours_name, &peer_name))
}

impl NetCompat {
    /// Our settings as a frame for the peer.
    pub fn to_frame(&self) -> PeerFrame {
        Frame::NetSettings {
            protocol: self.protocol.as_str().as_bytes()[0],
            after_sb_0pri: code_of(AfterSb0Pri::ALL, self.after_sb_0pri),
            after_sb_1pri: code_of(AfterSb1Pri::ALL, self.after_sb_1pri),
            after_sb_2pri: code_of(AfterSb2Pri::ALL, self.after_sb_2pri),
            flags: if self.allow_two_primaries {
                NET_ALLOW_TWO_PRIMARIES
            } else {
                0
            },
            integrity_alg: self.integrity_alg.clone().unwrap_or_default(),
        }
    }

    /// Checks the peer's `NetSettings` against ours, in DRBD's order; the error
    /// names the first setting that differs.
    pub fn check(&self, peer: &PeerFrame) -> Result<(), PeerError> {
        let Frame::NetSettings {
            protocol,
            after_sb_0pri,
            after_sb_1pri,
            after_sb_2pri,
            flags,
            integrity_alg,
        } = peer
        else {
            return Err(PeerError::Protocol(format!(
                "expected NetSettings during the handshake, got command {}",
                peer.command()
            )));
        };
        let ours = self.protocol.as_str();
        if ours.as_bytes()[0] != *protocol {
            let peer = Protocol::ALL
                .iter()
                .find(|(s, _)| s.as_bytes()[0] == *protocol)
                .map_or_else(
                    || format!("unknown code {protocol}"),
                    |(s, _)| (*s).to_owned(),
                );
            return Err(incompatible("protocol", ours, &peer));
        }
        // The peer's discard-local is our discard-remote (DRBD's convert_after_sb).
        check_keyword(
            "after-sb-0pri",
            AfterSb0Pri::ALL,
            self.after_sb_0pri,
            *after_sb_0pri,
            |p| match p {
                AfterSb0Pri::DiscardLocal => AfterSb0Pri::DiscardRemote,
                AfterSb0Pri::DiscardRemote => AfterSb0Pri::DiscardLocal,
                other => other,
            },
        )?;
        check_keyword(
            "after-sb-1pri",
            AfterSb1Pri::ALL,
            self.after_sb_1pri,
            *after_sb_1pri,
            |p| p,
        )?;
        check_keyword(
            "after-sb-2pri",
            AfterSb2Pri::ALL,
            self.after_sb_2pri,
            *after_sb_2pri,
            |p| p,
        )?;
        let peer_two = flags & NET_ALLOW_TWO_PRIMARIES != 0;
        if peer_two != self.allow_two_primaries {
            let yn = |b: bool| if b { "yes" } else { "no" };
            return Err(incompatible(
                "allow-two-primaries",
                yn(self.allow_two_primaries),
                yn(peer_two),
            ));
        }
        let ours_alg = self.integrity_alg.as_deref().unwrap_or("");
        if ours_alg != integrity_alg.as_str() {
            let show = |s: &str| {
                if s.is_empty() {
                    "none".to_owned()
                } else {
                    s.to_owned()
                }
            };
            return Err(incompatible(
                "data-integrity-alg",
                &show(ours_alg),
                &show(integrity_alg),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(a: &NetCompat, b: &NetCompat) -> Result<(), String> {
        a.check(&b.to_frame()).map_err(|e| e.to_string())
    }

    #[test]
    fn equal_settings_connect() {
        let a = NetCompat::default();
        assert_eq!(check(&a, &a), Ok(()));
        let b = NetCompat {
            protocol: Protocol::A,
            after_sb_0pri: AfterSb0Pri::DiscardZeroChanges,
            after_sb_1pri: AfterSb1Pri::Consensus,
            after_sb_2pri: AfterSb2Pri::ViolentlyAs0p,
            allow_two_primaries: true,
            integrity_alg: Some("crc32c".into()),
        };
        assert_eq!(check(&b, &b), Ok(()));
    }

    #[test]
    fn discard_local_matches_the_peers_discard_remote() {
        let a = NetCompat {
            after_sb_0pri: AfterSb0Pri::DiscardLocal,
            ..NetCompat::default()
        };
        let b = NetCompat {
            after_sb_0pri: AfterSb0Pri::DiscardRemote,
            ..NetCompat::default()
        };
        assert_eq!(check(&a, &b), Ok(()));
        assert_eq!(check(&b, &a), Ok(()));
        // Both discarding their own data (or both the peer's) cannot agree.
        let e = check(&a, &a).unwrap_err();
        assert!(e.starts_with("incompatible after-sb-0pri settings"), "{e}");
        let e = check(&b, &b).unwrap_err();
        assert!(e.starts_with("incompatible after-sb-0pri settings"), "{e}");
    }

    #[test]
    fn each_difference_is_named_with_drbds_text() {
        let base = NetCompat::default();
        let cases: Vec<(NetCompat, &str)> = vec![
            (
                NetCompat {
                    protocol: Protocol::A,
                    ..base.clone()
                },
                "incompatible protocol settings (ours C, peer A)",
            ),
            (
                NetCompat {
                    after_sb_0pri: AfterSb0Pri::DiscardLeastChanges,
                    ..base.clone()
                },
                "incompatible after-sb-0pri settings (ours disconnect, peer discard-least-changes)",
            ),
            (
                NetCompat {
                    after_sb_1pri: AfterSb1Pri::DiscardSecondary,
                    ..base.clone()
                },
                "incompatible after-sb-1pri settings (ours disconnect, peer discard-secondary)",
            ),
            (
                NetCompat {
                    after_sb_2pri: AfterSb2Pri::CallPriLostAfterSb,
                    ..base.clone()
                },
                "incompatible after-sb-2pri settings (ours disconnect, peer call-pri-lost-after-sb)",
            ),
            (
                NetCompat {
                    allow_two_primaries: true,
                    ..base.clone()
                },
                "incompatible allow-two-primaries settings (ours no, peer yes)",
            ),
            (
                NetCompat {
                    integrity_alg: Some("crc32c".into()),
                    ..base.clone()
                },
                "incompatible data-integrity-alg settings (ours none, peer crc32c)",
            ),
        ];
        for (peer, want) in cases {
            assert_eq!(check(&base, &peer), Err(want.to_owned()));
        }
    }

    #[test]
    fn unknown_codes_and_other_frames_are_refused() {
        let base = NetCompat::default();
        let Frame::NetSettings {
            protocol,
            after_sb_1pri,
            after_sb_2pri,
            flags,
            integrity_alg,
            ..
        } = base.to_frame()
        else {
            unreachable!("to_frame builds NetSettings")
        };
        let bad = Frame::NetSettings {
            protocol,
            after_sb_0pri: 200,
            after_sb_1pri,
            after_sb_2pri,
            flags,
            integrity_alg,
        };
        let e = base.check(&bad).unwrap_err().to_string();
        assert_eq!(
            e,
            "incompatible after-sb-0pri settings (ours disconnect, peer unknown code 200)"
        );
        assert!(base.check(&Frame::Ping).is_err());
    }
}
