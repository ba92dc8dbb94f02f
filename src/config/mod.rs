//! Configuration in DRBD 8.4 syntax (`drbd.conf`), parsed by hand with the position of
//! every token, so that every error and warning names `file:line:col`.
//!
//! Layers: [`syntax`] (lexer and generic statement tree, nesting bound), `include`
//! (files, globs, cycles, size bounds), `keywords` (DRBD 8.4's keyword list per section
//! and what rdb implements), `values` (sizes, times, addresses ...), `semantic`
//! (sections, inheritance common -> resource -> on, `resolve`, `dump`) and `model` (the
//! typed result). The grammar and keyword tables are documented in
//! `docs/configuration.md`.

mod error;
mod include;
mod keywords;
mod model;
mod semantic;
mod syntax;
mod values;

use std::path::Path;

pub use error::{ConfigError, Pos, Warning};
pub use include::{
    MAX_FILES, MAX_FILE_BYTES, MAX_GLOB_MATCHES, MAX_INCLUDE_DEPTH, MAX_TOTAL_BYTES,
};
pub use model::{
    AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, DiskConfig, FrontendKind, HostConfig, IoEngineKind,
    MetaDisk, NetConfig, OnCongestion, OnIoError, Protocol, ResourceConfig, StartupConfig,
    VolumeConfig,
};
pub use semantic::Config;
pub use syntax::{MAX_NESTING, MAX_STATEMENTS};
pub use values::{DEFAULT_NBD_PORT, DEFAULT_PORT};

/// Where rdbd and rdbadm look for the configuration by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rdb/rdb.conf";

/// Reads the configuration at `path` and every file it includes.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    semantic::build(include::load(path)?)
}

/// Parses `text` as if it were the contents of `file`; includes are read from disk,
/// relative to `file`'s directory.
pub fn parse_str(text: &str, file: &Path) -> Result<Config, ConfigError> {
    semantic::build(include::parse_text(text, file)?)
}
