//! Lexer and generic statement tree of the DRBD configuration syntax.
//!
//! DRBD's syntax is uniform: a statement is `keyword arg* ;` or `keyword arg* { statement* }`.
//! This module turns text into that tree, with the position of every token, and knows
//! nothing of the meaning of keywords (see `semantic`). Bounds: the caller limits the
//! text size; nesting is limited to [`MAX_NESTING`] so recursion depth is bounded.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use super::error::{clip, ConfigError, Pos};

/// Deepest allowed section nesting (DRBD itself needs 4: resource > on > volume > disk).
pub const MAX_NESTING: usize = 8;
/// Most statements in one file (bounds the tree's memory; real files have hundreds).
pub const MAX_STATEMENTS: usize = 65_536;

/// Kinds of tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokKind {
    Word,
    Str,
    Open,
    Close,
    Semi,
    Eof,
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokKind,
    text: String,
    pos: Pos,
    end: Pos,
}

/// A word or quoted string with its place.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Arg {
    pub text: String,
    pub quoted: bool,
    pub pos: Pos,
    /// Position just after the last character of the token.
    pub end: Pos,
}

/// `keyword args... ;` or `keyword args... { ... }`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stmt {
    pub kw: Arg,
    pub args: Vec<Arg>,
    pub block: Option<Block>,
}

/// The body of a section.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Block {
    pub open: Pos,
    pub stmts: Vec<Stmt>,
}

impl Stmt {
    /// Name of the statement for messages.
    pub fn name(&self) -> &str {
        &self.kw.text
    }

    /// End of the last token before where `;` or `{` belongs.
    pub fn last_end(&self) -> &Pos {
        self.args.last().map_or(&self.kw.end, |a| &a.end)
    }
}

struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    file: Arc<Path>,
    line: u32,
    col: u32,
}

impl Lexer<'_> {
    fn here(&self) -> Pos {
        Pos {
            file: self.file.clone(),
            line: self.line,
            col: self.col,
        }
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line = self.line.saturating_add(1);
            self.col = 1;
        } else {
            self.col = self.col.saturating_add(1);
        }
        Some(c)
    }

    fn next_token(&mut self) -> Result<Token, ConfigError> {
        // Skip white space and comments.
        loop {
            match self.chars.peek() {
                Some(c) if c.is_whitespace() => {
                    self.bump();
                }
                Some('#') => {
                    while let Some(&c) = self.chars.peek() {
                        if c == '\n' {
                            break;
                        }
                        self.bump();
                    }
                }
                _ => break,
            }
        }
        let pos = self.here();
        let Some(&c) = self.chars.peek() else {
            return Ok(Token {
                kind: TokKind::Eof,
                text: String::new(),
                end: pos.clone(),
                pos,
            });
        };
        let single = |kind| (kind, c.to_string());
        let (kind, text) = match c {
            '{' => {
                self.bump();
                single(TokKind::Open)
            }
            '}' => {
                self.bump();
                single(TokKind::Close)
            }
            ';' => {
                self.bump();
                single(TokKind::Semi)
            }
            '"' => {
                self.bump();
                (TokKind::Str, self.string_body(&pos)?)
            }
            _ => {
                let mut text = String::new();
                while let Some(&c) = self.chars.peek() {
                    if c.is_whitespace() || matches!(c, ';' | '{' | '}' | '"' | '#') {
                        break;
                    }
                    text.push(c);
                    self.bump();
                }
                (TokKind::Word, text)
            }
        };
        Ok(Token {
            kind,
            text,
            pos,
            end: self.here(),
        })
    }

    /// After the opening quote: the string's content up to the closing quote.
    fn string_body(&mut self, open: &Pos) -> Result<String, ConfigError> {
        let mut text = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => {
                    return Err(ConfigError::syntax(
                        open,
                        "unterminated string (missing closing '\"' on the same line)",
                    ))
                }
                Some('"') => return Ok(text),
                Some('\\') => match self.bump() {
                    None | Some('\n') => {
                        return Err(ConfigError::syntax(
                            open,
                            "unterminated string (missing closing '\"' on the same line)",
                        ))
                    }
                    Some('n') => text.push('\n'),
                    Some('t') => text.push('\t'),
                    Some('r') => text.push('\r'),
                    Some(c) => text.push(c),
                },
                Some(c) => text.push(c),
            }
        }
    }
}

struct Parser<'a> {
    lexer: Lexer<'a>,
    statements: usize,
}

impl Parser<'_> {
    /// Statements up to the matching `}` (when `open` is given) or the end of the file.
    fn stmts(&mut self, depth: usize, open: Option<&Pos>) -> Result<Vec<Stmt>, ConfigError> {
        let mut out = Vec::new();
        loop {
            let tok = self.lexer.next_token()?;
            match tok.kind {
                TokKind::Eof => match open {
                    Some(o) => {
                        return Err(ConfigError::syntax(
                            &tok.pos,
                            format!(
                                "unexpected end of file, missing '}}' for section opened at {}",
                                o.line_col()
                            ),
                        ))
                    }
                    None => return Ok(out),
                },
                TokKind::Close => match open {
                    Some(_) => return Ok(out),
                    None => {
                        return Err(ConfigError::syntax(
                            &tok.pos,
                            "unbalanced '}' (no section is open here)",
                        ))
                    }
                },
                TokKind::Semi => {
                    return Err(ConfigError::syntax(
                        &tok.pos,
                        "unexpected ';' (empty statement)",
                    ))
                }
                TokKind::Open => {
                    return Err(ConfigError::syntax(
                        &tok.pos,
                        "unexpected '{' (a section starts with a keyword)",
                    ))
                }
                TokKind::Str => {
                    return Err(ConfigError::syntax(
                        &tok.pos,
                        format!("expected a keyword, found string \"{}\"", clip(&tok.text)),
                    ))
                }
                TokKind::Word => out.push(self.stmt(tok, depth)?),
            }
        }
    }

    fn stmt(&mut self, kw: Token, depth: usize) -> Result<Stmt, ConfigError> {
        self.statements += 1;
        if self.statements > MAX_STATEMENTS {
            return Err(ConfigError::Limit {
                pos: kw.pos,
                what: "number of statements in one file".to_string(),
                limit: MAX_STATEMENTS as u64,
            });
        }
        let mut stmt = Stmt {
            kw: Arg {
                text: kw.text,
                quoted: false,
                pos: kw.pos,
                end: kw.end,
            },
            args: Vec::new(),
            block: None,
        };
        loop {
            let tok = self.lexer.next_token()?;
            match tok.kind {
                TokKind::Word | TokKind::Str => stmt.args.push(Arg {
                    text: tok.text,
                    quoted: tok.kind == TokKind::Str,
                    pos: tok.pos,
                    end: tok.end,
                }),
                TokKind::Semi => return Ok(stmt),
                TokKind::Open => {
                    if depth + 1 > MAX_NESTING {
                        return Err(ConfigError::Limit {
                            pos: tok.pos,
                            what: "section nesting".to_string(),
                            limit: MAX_NESTING as u64,
                        });
                    }
                    let stmts = self.stmts(depth + 1, Some(&tok.pos))?;
                    stmt.block = Some(Block {
                        open: tok.pos,
                        stmts,
                    });
                    return Ok(stmt);
                }
                TokKind::Close | TokKind::Eof => {
                    let last = stmt.args.last().map_or(&stmt.kw, |a| a);
                    return Err(ConfigError::syntax(
                        &last.end,
                        format!("missing ';' after '{}'", clip(&last.text)),
                    ));
                }
            }
        }
    }
}

/// Parses one file's text into statements (includes are not expanded here).
pub(crate) fn parse(text: &str, file: Arc<Path>) -> Result<Vec<Stmt>, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut p = Parser {
        lexer: Lexer {
            chars: text.chars().peekable(),
            file,
            line: 1,
            col: 1,
        },
        statements: 0,
    };
    p.stmts(0, None)
}

/// Writes statements back in normalized DRBD syntax (4-space indentation).
pub(crate) fn write_stmts(out: &mut String, stmts: &[Stmt], indent: usize) {
    for s in stmts {
        write_stmt(out, s, indent);
    }
}

pub(crate) fn write_stmt(out: &mut String, s: &Stmt, indent: usize) {
    let pad = "    ".repeat(indent);
    out.push_str(&pad);
    out.push_str(&s.kw.text);
    for a in &s.args {
        out.push(' ');
        out.push_str(&quote_if_needed(&a.text, a.quoted));
    }
    match &s.block {
        None => out.push_str(";\n"),
        Some(b) => {
            out.push_str(" {\n");
            write_stmts(out, &b.stmts, indent + 1);
            out.push_str(&pad);
            out.push_str("}\n");
        }
    }
}

/// Renders a value so that the lexer reads it back as the same single token.
pub(crate) fn quote_if_needed(text: &str, quoted: bool) -> String {
    let plain = !quoted
        && !text.is_empty()
        && !text
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, ';' | '{' | '}' | '"' | '#' | '\\'));
    if plain {
        return text.to_string();
    }
    let mut s = String::with_capacity(text.len() + 2);
    s.push('"');
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            '\r' => s.push_str("\\r"),
            c => {
                let _ = write!(s, "{c}");
            }
        }
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Vec<Stmt>, ConfigError> {
        parse(text, Arc::from(Path::new("t.conf")))
    }

    #[test]
    fn statements_and_blocks() {
        let s = p("a b \"c d\"; # comment\nsec x {\n  k v;\n}\n").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].args[1].text, "c d");
        assert!(s[0].args[1].quoted);
        let b = s[1].block.as_ref().unwrap();
        assert_eq!(b.stmts[0].kw.text, "k");
        assert_eq!((b.stmts[0].kw.pos.line, b.stmts[0].kw.pos.col), (3, 3));
    }

    #[test]
    fn escapes() {
        let s = p(r#"k "a\"b\\c\nd\x";"#).unwrap();
        assert_eq!(s[0].args[0].text, "a\"b\\c\ndx");
    }

    #[test]
    fn errors_have_positions() {
        let e = p("k \"abc\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.conf:1:3: unterminated string (missing closing '\"' on the same line)"
        );
        let e = p("a {\n b c\n}").unwrap_err();
        assert_eq!(e.to_string(), "t.conf:2:5: missing ';' after 'c'");
        let e = p("a {\n b c;\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.conf:3:1: unexpected end of file, missing '}' for section opened at 1:3"
        );
        let e = p("}").unwrap_err();
        assert_eq!(e.pos().unwrap().col, 1);
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let text = "a {".repeat(100_000);
        let e = p(&text).unwrap_err();
        assert!(matches!(e, ConfigError::Limit { .. }), "{e}");
    }

    #[test]
    fn statement_count_is_bounded() {
        let text = "a;".repeat(MAX_STATEMENTS + 1);
        let e = p(&text).unwrap_err();
        assert!(matches!(e, ConfigError::Limit { .. }), "{e}");
        assert_eq!(e.pos().unwrap().col as usize, 2 * MAX_STATEMENTS + 1);
    }

    #[test]
    fn quoting_round_trips() {
        for t in [
            "plain",
            "",
            "with space",
            "q\"uote",
            "back\\slash",
            "semi;",
            "#x",
            "nl\nx",
        ] {
            let text = format!("k {};", quote_if_needed(t, false));
            let s = p(&text).unwrap();
            assert_eq!(s[0].args[0].text, t);
        }
    }
}
