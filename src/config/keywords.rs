//! The keywords of DRBD 8.4's drbd.conf (plus rdb's extensions), per section, and which
//! of them rdb implements. Used for recognition, warnings and "did you mean" suggestions.

/// The sections of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Top,
    Global,
    Common,
    Resource,
    On,
    Floating,
    Stacked,
    Volume,
    Disk,
    Net,
    Startup,
    Options,
    Handlers,
    Syncer,
    Proxy,
}

impl Section {
    pub fn name(self) -> &'static str {
        match self {
            Section::Top => "top level",
            Section::Global => "global",
            Section::Common => "common",
            Section::Resource => "resource",
            Section::On => "on",
            Section::Floating => "floating",
            Section::Stacked => "stacked-on-top-of",
            Section::Volume => "volume",
            Section::Disk => "disk",
            Section::Net => "net",
            Section::Startup => "startup",
            Section::Options => "options",
            Section::Handlers => "handlers",
            Section::Syncer => "syncer",
            Section::Proxy => "proxy",
        }
    }
}

/// Shape of a keyword that rdb accepts without implementing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Exactly one value.
    One,
    /// One or more values.
    Many,
    /// Boolean: bare (= yes) or `yes`/`no`.
    Bool,
    /// 8.3-style flag without a value (`no-disk-flushes;`).
    Flag,
    /// A section `{ ... }` with any names before it.
    Block,
}

/// Keywords rdb implements, per section.
pub(crate) fn implemented(s: Section) -> &'static [&'static str] {
    match s {
        Section::Top => &["global", "common", "resource", "include", "skip"],
        Section::Global => &["usage-count", "control-group"],
        Section::Common => &[
            "disk", "net", "startup", "options", "handlers", "syncer", "protocol",
        ],
        Section::Resource => &[
            "on",
            "volume",
            "device",
            "disk",
            "meta-disk",
            "flexible-meta-disk",
            "net",
            "startup",
            "options",
            "handlers",
            "syncer",
            "protocol",
            "nbd-listen",
            "frontend",
            "frontend-queues",
            "frontend-queue-depth",
            "nbd-busy-poll",
            "peer-busy-poll",
        ],
        Section::On => &[
            "address",
            "volume",
            "device",
            "disk",
            "meta-disk",
            "flexible-meta-disk",
            "nbd-listen",
            "frontend",
        ],
        Section::Floating | Section::Stacked => &[
            "address",
            "volume",
            "device",
            "disk",
            "meta-disk",
            "flexible-meta-disk",
        ],
        Section::Volume => &["device", "disk", "meta-disk", "flexible-meta-disk"],
        Section::Disk => &[
            "on-io-error",
            "resync-rate",
            "al-extents",
            "c-plan-ahead",
            "c-fill-target",
            "c-max-rate",
            "c-min-rate",
            "io-engine",
            "direct-io",
            "al-updates",
            "disk-flushes",
            "no-disk-flushes",
        ],
        Section::Net => &[
            "protocol",
            "cram-hmac-alg",
            "shared-secret",
            "ping-int",
            "ping-timeout",
            "timeout",
            "connect-int",
            "ko-count",
            "sndbuf-size",
            "rcvbuf-size",
            "max-buffers",
            "max-epoch-size",
            "allow-two-primaries",
            "after-sb-0pri",
            "after-sb-1pri",
            "after-sb-2pri",
            "data-integrity-alg",
            "csums-alg",
            "verify-alg",
            "on-congestion",
            "congestion-fill",
            "congestion-extents",
        ],
        Section::Startup => &[
            "wfc-timeout",
            "degr-wfc-timeout",
            "outdated-wfc-timeout",
            "wait-after-sb",
            "become-primary-on",
        ],
        Section::Options => &[],
        Section::Handlers => HANDLERS,
        Section::Syncer => &[
            "rate",
            "al-extents",
            "verify-alg",
            "csums-alg",
            "c-plan-ahead",
            "c-fill-target",
            "c-max-rate",
            "c-min-rate",
        ],
        Section::Proxy => &[],
    }
}

/// Handler names of DRBD 8.4 (all stored in `ResourceConfig::handlers`).
pub(crate) const HANDLERS: &[&str] = &[
    "pri-on-incon-degr",
    "pri-lost-after-sb",
    "pri-lost",
    "fence-peer",
    "unfence-peer",
    "local-io-error",
    "initial-split-brain",
    "split-brain",
    "before-resync-target",
    "after-resync-target",
    "out-of-sync",
];

/// Keywords DRBD 8.4 knows that rdb accepts with a warning, per section.
pub(crate) fn ignored(s: Section) -> &'static [(&'static str, Shape)] {
    use Shape::*;
    match s {
        Section::Top | Section::Volume | Section::Handlers => &[],
        Section::Global => &[
            ("minor-count", One),
            ("dialog-refresh", One),
            ("disable-ip-verification", Bool),
            ("udev-always-use-vnr", Bool),
        ],
        Section::Common => &[("proxy", Block)],
        Section::Resource => &[
            ("floating", Block),
            ("stacked-on-top-of", Block),
            ("proxy", Block),
        ],
        Section::On | Section::Floating | Section::Stacked => &[("proxy", Block)],
        Section::Disk => &[
            ("fencing", One),
            ("size", One),
            ("max-bio-bvecs", One),
            ("disk-barrier", Bool),
            ("disk-drain", Bool),
            ("md-flushes", Bool),
            ("resync-after", One),
            ("c-delay-target", One),
            ("disk-timeout", One),
            ("read-balancing", One),
            ("discard-zeroes-if-aligned", Bool),
            ("rs-discard-granularity", One),
            ("disable-write-same", Bool),
            ("no-disk-barrier", Flag),
            ("no-disk-drain", Flag),
            ("no-md-flushes", Flag),
            ("use-bmbv", Flag),
        ],
        Section::Net => &[
            ("always-asbp", Bool),
            ("rr-conflict", One),
            ("tcp-cork", Bool),
            ("use-rle", Bool),
            ("unplug-watermark", One),
            ("csums-after-crash-only", Bool),
            ("socket-check-timeout", One),
            ("discard-my-data", Bool),
            ("tentative", Bool),
            ("no-tcp-cork", Flag),
        ],
        Section::Startup => &[("stacked-timeouts", Flag)],
        Section::Options => &[("cpu-mask", One), ("on-no-data-accessible", One)],
        Section::Syncer => &[
            ("after", One),
            ("use-rle", Bool),
            ("cpu-mask", One),
            ("delay-probe-volume", One),
            ("delay-probe-interval", One),
            ("c-delay-target", One),
            ("on-no-data-accessible", One),
            ("throttle-threshold", One),
            ("hold-off-threshold", One),
        ],
        Section::Proxy => &[
            ("memlimit", One),
            ("read-loops", One),
            ("compression", One),
            ("bwlimit", One),
            ("inside", Many),
            ("outside", Many),
            ("plugin", Block),
        ],
    }
}

/// Every section, for "valid in: ..." hints.
const ALL_SECTIONS: &[Section] = &[
    Section::Top,
    Section::Global,
    Section::Common,
    Section::Resource,
    Section::On,
    Section::Floating,
    Section::Stacked,
    Section::Volume,
    Section::Disk,
    Section::Net,
    Section::Startup,
    Section::Options,
    Section::Handlers,
    Section::Syncer,
    Section::Proxy,
];

/// Sections other than `s` where `word` is a keyword.
pub(crate) fn valid_elsewhere(s: Section, word: &str) -> Vec<&'static str> {
    ALL_SECTIONS
        .iter()
        .filter(|&&o| o != s)
        .filter(|&&o| implemented(o).contains(&word) || ignored(o).iter().any(|(k, _)| *k == word))
        .map(|o| o.name())
        .collect()
}

/// Longest word for which a suggestion is computed (bounds the edit distance's cost).
const MAX_SUGGEST_CHARS: usize = 64;

/// The keyword of section `s` closest to `word`, if it is close enough.
pub(crate) fn suggest(s: Section, word: &str) -> Option<&'static str> {
    if word.chars().count() > MAX_SUGGEST_CHARS {
        return None;
    }
    let candidates = implemented(s)
        .iter()
        .copied()
        .chain(ignored(s).iter().map(|(k, _)| *k))
        .filter(|k| *k != "include" && *k != "skip");
    let mut best: Option<(usize, &'static str)> = None;
    for k in candidates {
        let d = edit_distance(word, k);
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, k));
        }
    }
    let (d, k) = best?;
    let len = word.chars().count().max(k.len());
    (d <= 2 || d * 3 <= len).then_some(k)
}

/// Levenshtein distance (insert, delete, substitute), O(a x b) time, O(b) memory.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance() {
        assert_eq!(edit_distance("protcol", "protocol"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest(Section::Net, "protcol"), Some("protocol"));
        assert_eq!(
            suggest(Section::Net, "shared-secrte"),
            Some("shared-secret")
        );
        assert_eq!(suggest(Section::Disk, "resync-rat"), Some("resync-rate"));
        assert_eq!(suggest(Section::Net, "xyzzyplugh"), None);
    }

    #[test]
    fn no_keyword_is_both_implemented_and_ignored() {
        for &s in ALL_SECTIONS {
            for (k, _) in ignored(s) {
                assert!(!implemented(s).contains(k), "{k} in {}", s.name());
            }
        }
    }
}
