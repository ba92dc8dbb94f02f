//! rdb-protocol: the wire formats of rdb, sans I/O.
//!
//! Every format here is encoded to and decoded from byte slices; nothing in this crate
//! touches a socket, a file or a clock, so each decoder can be fuzzed in isolation.
//! Decoders never panic on bad input: they return a typed error.
//!
//! - [`nbd`]: the NBD protocol (handshake options, requests, simple and structured replies);
//! - [`repl`]: rdb's replication frames between nodes.

pub mod heartbeat;
pub mod nbd;
pub mod repl;
