//! Positions, warnings and the typed error of the configuration parser.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A place in a configuration file: 1-based line and column (columns count characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pos {
    /// The file as it was named (include paths are joined to the including file's dir).
    pub file: Arc<Path>,
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

impl serde::Serialize for Pos {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Pos", 3)?;
        st.serialize_field("file", &self.file.display().to_string())?;
        st.serialize_field("line", &self.line)?;
        st.serialize_field("col", &self.col)?;
        st.end()
    }
}

impl Pos {
    /// `L:C` without the file name, for "opened at L:C" style references.
    pub fn line_col(&self) -> String {
        format!("{}:{}", self.line, self.col)
    }
}

/// A keyword DRBD knows but rdb does not implement, or another harmless oddity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Warning {
    /// Where the keyword is.
    pub pos: Pos,
    /// What is wrong, without position.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: warning: {}", self.pos, self.message)
    }
}

/// Every way loading or resolving a configuration can fail.
///
/// Display starts with `file:line:col: ` whenever the error has a position.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read (the position is the `include` that named it, if any).
    #[error("{}cannot read {}: {source}", prefix(.pos.as_ref()), .path.display())]
    Io {
        /// The `include` statement, or `None` for the top-level file.
        pos: Option<Pos>,
        /// The file that failed.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Lexical or grammatical error: unterminated string, missing `;`, unbalanced braces ...
    #[error("{pos}: {message}")]
    Syntax {
        /// Where the problem was detected.
        pos: Pos,
        /// What is wrong.
        message: String,
    },
    /// A word that is not a keyword of this section, in DRBD 8.4 nor in rdb.
    #[error("{pos}: unknown keyword '{keyword}' in section {section}{}", suggest(.suggestion.as_deref()))]
    UnknownKeyword {
        /// The word.
        pos: Pos,
        /// The word as written (truncated if huge).
        keyword: String,
        /// The section it appeared in (`top level`, `resource`, `net` ...).
        section: String,
        /// The closest keyword valid in that section, if any is close.
        suggestion: Option<String>,
    },
    /// A keyword with a bad value: protocol letter, address, size, number out of range ...
    #[error("{pos}: invalid value '{value}' for '{keyword}': {reason}")]
    InvalidValue {
        /// The offending token.
        pos: Pos,
        /// The keyword it belongs to.
        keyword: String,
        /// The value as written (truncated if huge).
        value: String,
        /// Why it is refused and what is expected.
        reason: String,
    },
    /// A thing defined twice where only one is allowed.
    #[error("{pos}: duplicate {what} (first defined at {first})")]
    Duplicate {
        /// The second definition.
        pos: Pos,
        /// What is duplicated, e.g. `resource 'r0'` or `option 'protocol' in section net`.
        what: String,
        /// The first definition.
        first: Pos,
    },
    /// An include chain that comes back to a file already being read.
    #[error("{pos}: include cycle: {}", .chain.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" -> "))]
    IncludeCycle {
        /// The `include` statement closing the cycle.
        pos: Pos,
        /// The files of the cycle, first to last (the last equals an earlier one).
        chain: Vec<PathBuf>,
    },
    /// A bound on input size, include depth or nesting was exceeded.
    #[error("{pos}: {what} exceeds the limit of {limit}")]
    Limit {
        /// Where the bound was hit.
        pos: Pos,
        /// What grew too large.
        what: String,
        /// The bound.
        limit: u64,
    },
    /// `resolve` or `dump` asked for a resource that is not defined.
    #[error("no such resource '{name}' (defined: {})", list(.known))]
    NoSuchResource {
        /// The name asked for.
        name: String,
        /// The resources that exist.
        known: Vec<String>,
    },
    /// `resolve` asked for a node that has no `on` section in the resource.
    #[error("{pos}: resource '{resource}' has no 'on {node}' section (hosts: {})", list(.known))]
    NoSuchHost {
        /// The resource's name token.
        pos: Pos,
        /// The resource.
        resource: String,
        /// The node asked for.
        node: String,
        /// The hosts that have `on` sections.
        known: Vec<String>,
    },
    /// A resource is incomplete for a node: no disk, device or address.
    #[error("{pos}: resource '{resource}' on host '{node}': {what}")]
    Missing {
        /// The `on` section (or the resource) lacking the value.
        pos: Pos,
        /// The resource.
        resource: String,
        /// The host concerned.
        node: String,
        /// What is missing, e.g. `missing 'disk' for volume 0`.
        what: String,
    },
}

impl ConfigError {
    /// The position of the error, if it has one.
    pub fn pos(&self) -> Option<&Pos> {
        match self {
            ConfigError::Io { pos, .. } => pos.as_ref(),
            ConfigError::Syntax { pos, .. }
            | ConfigError::UnknownKeyword { pos, .. }
            | ConfigError::InvalidValue { pos, .. }
            | ConfigError::Duplicate { pos, .. }
            | ConfigError::IncludeCycle { pos, .. }
            | ConfigError::Limit { pos, .. }
            | ConfigError::NoSuchHost { pos, .. }
            | ConfigError::Missing { pos, .. } => Some(pos),
            ConfigError::NoSuchResource { .. } => None,
        }
    }

    pub(crate) fn syntax(pos: &Pos, message: impl Into<String>) -> Self {
        ConfigError::Syntax {
            pos: pos.clone(),
            message: message.into(),
        }
    }

    pub(crate) fn invalid(
        pos: &Pos,
        keyword: &str,
        value: &str,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError::InvalidValue {
            pos: pos.clone(),
            keyword: keyword.to_string(),
            value: clip(value),
            reason: reason.into(),
        }
    }
}

fn prefix(pos: Option<&Pos>) -> String {
    pos.map(|p| format!("{p}: ")).unwrap_or_default()
}

fn suggest(s: Option<&str>) -> String {
    s.map(|s| format!(" (did you mean '{s}'?)"))
        .unwrap_or_default()
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

/// Longest piece of user text quoted back in a message, in characters.
const CLIP_CHARS: usize = 64;

/// Shortens user text for messages so that a huge token cannot make a huge error.
pub(crate) fn clip(s: &str) -> String {
    if s.chars().count() <= CLIP_CHARS {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(CLIP_CHARS).collect();
        out.push_str("...");
        out
    }
}
