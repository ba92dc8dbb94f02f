//! Reading configuration files and expanding top-level `include "pattern";` statements.
//!
//! Patterns are relative to the including file's directory and may use glob(3) wildcards
//! (`*`, `?`, `[...]`) in any component; matches are sorted, and a pattern with wildcards
//! that matches nothing is not an error (a literal path that does not exist is). Cycles are
//! an error. Everything is bounded: file size, total size, number of files, include depth,
//! glob matches; files are opened non-blocking and must be regular files, so an include
//! of a FIFO, a device or `/proc/kmsg` cannot hang the parser.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::error::{ConfigError, Pos};
use super::syntax::{self, Stmt};

/// Largest configuration file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Largest sum of all files of one configuration, in bytes.
pub const MAX_TOTAL_BYTES: u64 = 8 << 20;
/// Most files in one configuration (the top file and all includes).
pub const MAX_FILES: usize = 128;
/// Deepest include chain.
pub const MAX_INCLUDE_DEPTH: usize = 8;
/// Most paths one include pattern may expand to (also bounds intermediate directories).
pub const MAX_GLOB_MATCHES: usize = 256;

struct Loader {
    files: usize,
    total_bytes: u64,
    /// Canonical paths of the files being read, outermost first.
    stack: Vec<PathBuf>,
}

/// Reads `path` and every file it includes, returning the top-level statements in order.
pub(crate) fn load(path: &Path) -> Result<Vec<Stmt>, ConfigError> {
    let text = read_bounded(path).map_err(|source| ConfigError::Io {
        pos: None,
        path: path.to_path_buf(),
        source,
    })?;
    let file: Arc<Path> = Arc::from(path);
    let text = into_text(text, &file)?;
    let mut loader = Loader {
        files: 1,
        total_bytes: text.len() as u64,
        stack: Vec::new(),
    };
    loader.expand(&text, file, identity(path), 0)
}

/// Parses `text` as the contents of `file`, expanding its includes from disk.
pub(crate) fn parse_text(text: &str, file: &Path) -> Result<Vec<Stmt>, ConfigError> {
    let file: Arc<Path> = Arc::from(file);
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigError::Limit {
            pos: start_of(&file),
            what: "file size in bytes".to_string(),
            limit: MAX_FILE_BYTES,
        });
    }
    let mut loader = Loader {
        files: 1,
        total_bytes: text.len() as u64,
        stack: Vec::new(),
    };
    let id = identity(&file);
    loader.expand(text, file, id, 0)
}

fn start_of(file: &Arc<Path>) -> Pos {
    Pos {
        file: file.clone(),
        line: 1,
        col: 1,
    }
}

/// The name used to detect cycles: the canonical path, or the absolute path if the file
/// does not exist (text given to `parse_str`).
fn identity(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| std::path::absolute(path).unwrap_or_default())
}

impl Loader {
    fn expand(
        &mut self,
        text: &str,
        file: Arc<Path>,
        id: PathBuf,
        depth: usize,
    ) -> Result<Vec<Stmt>, ConfigError> {
        self.stack.push(id);
        let stmts = syntax::parse(text, file.clone())?;
        let mut out = Vec::with_capacity(stmts.len());
        for st in stmts {
            if st.kw.text != "include" {
                out.push(st);
                continue;
            }
            let pattern = match (st.args.as_slice(), &st.block) {
                ([one], None) => one,
                _ => {
                    return Err(ConfigError::syntax(
                        &st.kw.pos,
                        "include takes exactly one file name or pattern: include \"PATH\";",
                    ))
                }
            };
            let base = file.parent().unwrap_or(Path::new(""));
            let full = base.join(&pattern.text);
            let paths = if has_wildcard(&pattern.text) {
                glob(&full).map_err(|what| ConfigError::Limit {
                    pos: pattern.pos.clone(),
                    what,
                    limit: MAX_GLOB_MATCHES as u64,
                })?
            } else {
                vec![full]
            };
            for path in paths {
                out.extend(self.include(&st, &path, depth + 1)?);
            }
        }
        self.stack.pop();
        Ok(out)
    }

    fn include(&mut self, st: &Stmt, path: &Path, depth: usize) -> Result<Vec<Stmt>, ConfigError> {
        let pos = &st.kw.pos;
        let io_err = |source| ConfigError::Io {
            pos: Some(pos.clone()),
            path: path.to_path_buf(),
            source,
        };
        if depth > MAX_INCLUDE_DEPTH {
            return Err(ConfigError::Limit {
                pos: pos.clone(),
                what: "include depth".to_string(),
                limit: MAX_INCLUDE_DEPTH as u64,
            });
        }
        let id = fs::canonicalize(path).map_err(io_err)?;
        if let Some(i) = self.stack.iter().position(|p| *p == id) {
            let mut chain = self.stack[i..].to_vec();
            chain.push(id);
            return Err(ConfigError::IncludeCycle {
                pos: pos.clone(),
                chain,
            });
        }
        self.files += 1;
        if self.files > MAX_FILES {
            return Err(ConfigError::Limit {
                pos: pos.clone(),
                what: "number of included files".to_string(),
                limit: MAX_FILES as u64,
            });
        }
        let bytes = read_bounded(path).map_err(io_err)?;
        self.total_bytes += bytes.len() as u64;
        if self.total_bytes > MAX_TOTAL_BYTES {
            return Err(ConfigError::Limit {
                pos: pos.clone(),
                what: "total configuration size in bytes".to_string(),
                limit: MAX_TOTAL_BYTES,
            });
        }
        let file: Arc<Path> = Arc::from(path);
        let text = into_text(bytes, &file)?;
        self.expand(&text, file, id, depth)
    }
}

/// Reads a regular file of at most [`MAX_FILE_BYTES`], without ever blocking on it.
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let f: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut buf = Vec::new();
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "file larger than {MAX_FILE_BYTES} bytes"
        )));
    }
    Ok(buf)
}

/// UTF-8 check with the position of the first bad byte.
fn into_text(bytes: Vec<u8>, file: &Arc<Path>) -> Result<String, ConfigError> {
    String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        // The prefix is valid UTF-8 by construction of `valid_up_to`.
        let prefix = String::from_utf8_lossy(good);
        let line = prefix.matches('\n').count() + 1;
        let col = prefix.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigError::syntax(
            &Pos {
                file: file.clone(),
                line: u32::try_from(line).unwrap_or(u32::MAX),
                col: u32::try_from(col).unwrap_or(u32::MAX),
            },
            "file is not valid UTF-8",
        )
    })
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Expands a glob pattern to the existing paths it matches, sorted per component.
/// Returns a description of the bound if the expansion grows beyond [`MAX_GLOB_MATCHES`].
fn glob(pattern: &Path) -> Result<Vec<PathBuf>, String> {
    let mut cands: Vec<PathBuf> = vec![PathBuf::new()];
    for comp in pattern.components() {
        match comp {
            Component::Normal(name) => {
                let Some(name) = name.to_str() else {
                    return Ok(Vec::new());
                };
                if !has_wildcard(name) {
                    for c in &mut cands {
                        c.push(name);
                    }
                    continue;
                }
                let pat: Vec<char> = name.chars().collect();
                let mut next = Vec::new();
                for dir in &cands {
                    let listing = if dir.as_os_str().is_empty() {
                        fs::read_dir(".")
                    } else {
                        fs::read_dir(dir)
                    };
                    // Like glob(3) without GLOB_ERR: unreadable directories match nothing.
                    let Ok(listing) = listing else { continue };
                    let mut names: Vec<String> = Vec::new();
                    for entry in listing.flatten() {
                        let Ok(n) = entry.file_name().into_string() else {
                            continue;
                        };
                        if n.starts_with('.') && !name.starts_with('.') {
                            continue;
                        }
                        let chars: Vec<char> = n.chars().collect();
                        if wild_match(&pat, &chars) {
                            names.push(n);
                            if names.len() + next.len() > MAX_GLOB_MATCHES {
                                return Err(
                                    "number of paths matched by an include pattern".to_string()
                                );
                            }
                        }
                    }
                    names.sort();
                    next.extend(names.into_iter().map(|n| dir.join(n)));
                }
                cands = next;
            }
            other => {
                for c in &mut cands {
                    c.push(other.as_os_str());
                }
            }
        }
    }
    cands.retain(|p| p.exists());
    Ok(cands)
}

/// Matches one pattern element at `pat[0..]` against `c`: Some(pattern length) if it does.
fn elem_match(pat: &[char], c: char) -> Option<usize> {
    match pat.first()? {
        '?' => Some(1),
        '[' => match class_match(pat, c) {
            Some((true, len)) => Some(len),
            Some((false, _)) => None,
            None => (c == '[').then_some(1),
        },
        '\\' if pat.len() > 1 => (pat[1] == c).then_some(2),
        &p => (p == c).then_some(1),
    }
}

/// `[...]` class at the start of `pat`: (matched, length), or None if it is not closed.
fn class_match(pat: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pat.get(i), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let &p = pat.get(i)?;
        if p == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if pat.get(i + 1) == Some(&'-') && pat.get(i + 2).is_some_and(|&e| e != ']') {
            let hi = pat[i + 2];
            if p <= c && c <= hi {
                matched = true;
            }
            i += 3;
        } else {
            if p == c {
                matched = true;
            }
            i += 1;
        }
    }
}

/// glob(3)-style match of a whole file name; `*` backtracks to the last star only, so the
/// cost is O(pattern x name).
fn wild_match(pat: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if pat.get(p) == Some(&'*') {
            star = Some((p, n));
            p += 1;
            continue;
        }
        if let Some(len) = elem_match(&pat[p.min(pat.len())..], name[n]) {
            p += len;
            n += 1;
            continue;
        }
        match star {
            Some((sp, sn)) => {
                p = sp + 1;
                n = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    while pat.get(p) == Some(&'*') {
        p += 1;
    }
    p == pat.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        wild_match(
            &p.chars().collect::<Vec<_>>(),
            &n.chars().collect::<Vec<_>>(),
        )
    }

    #[test]
    fn wildcards() {
        assert!(m("*.res", "data.res"));
        assert!(!m("*.res", "data.conf"));
        assert!(m("r?.res", "r0.res"));
        assert!(m("r[0-9].res", "r5.res"));
        assert!(!m("r[!0-9].res", "r5.res"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("*", ""));
        assert!(m("[x", "[x"));
        assert!(!m(&"*a".repeat(50), &"a".repeat(40)));
    }
}
