//! The NBD protocol (fixed newstyle handshake, simple and structured replies), sans I/O.
//!
//! This module owns every NBD constant rdb uses and the encoders/decoders of the
//! messages on the wire, following the NetworkBlockDevice project's `proto.md`. All
//! integers are big-endian. Decoders work on byte slices in a check-then-parse style:
//! they return [`DecodeError::Incomplete`] when more bytes are needed (the caller reads
//! more and retries) and another [`DecodeError`] variant when the bytes can never
//! form a valid message. They never panic and never allocate more than the bounded
//! payload they were handed.
//!
//! Layouts (see `docs/nbd.md` for the full picture):
//!
//! - server greeting (18 bytes): `NBDMAGIC` u64, `IHAVEOPT` u64, handshake flags u16;
//! - client flags (4 bytes): u32;
//! - option (16 + n bytes): `IHAVEOPT` u64, option u32, length u32, payload;
//! - option reply (20 + n bytes): `REPLY_MAGIC` u64, option u32, reply type u32,
//!   length u32, payload;
//! - request (28 + n bytes): `REQUEST_MAGIC` u32, flags u16, type u16, cookie u64,
//!   offset u64, length u32, then `length` bytes of payload for WRITE;
//! - simple reply (16 bytes): `SIMPLE_REPLY_MAGIC` u32, error u32, cookie u64;
//! - structured reply chunk (20 + n bytes): `STRUCTURED_REPLY_MAGIC` u32, flags u16,
//!   type u16, cookie u64, length u32, payload.

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic; also starts every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding after `EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this implementation knows.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// Transmission flag: the flags field is valid (always set).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server supports `NBD_CMD_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server supports `NBD_CMD_FLAG_FUA`.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export is rotational media.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: the server supports `NBD_CMD_TRIM`.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server supports `NBD_CMD_WRITE_ZEROES`.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the server supports `NBD_CMD_FLAG_DF`.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: a flush on one connection covers all connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: the server supports `NBD_CMD_RESIZE`.
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: the server supports `NBD_CMD_CACHE`.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the server supports `NBD_CMD_FLAG_FAST_ZERO`.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: select an export and enter transmission (no error possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: (withdrawn) peek export.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Option: start TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: negotiate structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list the metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: extended headers (not implemented; answered with `ERR_UNSUP`).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: the option is done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of `OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one information item of `OPT_INFO` / `OPT_GO`.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: unknown or unsupported option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option error: forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option error: syntactically or semantically invalid option.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option error: TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option error: unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option error: the client must request block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option error: the payload is too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Info item: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info item: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Info item: export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the request).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch hint).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command: resize (not implemented).
pub const CMD_RESIZE: u16 = 8;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (READ): do not fragment the reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (BLOCK_STATUS): return one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (WRITE_ZEROES): fail fast if zeroing is slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured chunk: no payload (used to end a reply).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk: offset + data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk: offset + hole length.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured chunk: block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured chunk: error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Structured chunk: error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` state bit: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state bit: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context rdb serves.
pub const META_BASE_ALLOCATION: &str = "base:allocation";

/// NBD wire error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// NBD wire error: input/output error.
pub const NBD_EIO: u32 = 5;
/// NBD wire error: cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// NBD wire error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// NBD wire error: no space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// NBD wire error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// NBD wire error: operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// NBD wire error: server shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Size of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Size of an option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of the header of an `OFFSET_DATA` chunk, offset included.
pub const OFFSET_DATA_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;
/// Zero padding after the `EXPORT_NAME` reply unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_PADDING_LEN: usize = 124;
/// Longest string (export name, message) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Default bound on an option payload.
pub const DEFAULT_MAX_OPTION_BYTES: u32 = 64 * 1024;
/// Default bound on a request payload (and on a READ length).
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 32 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message is not complete: `needed_bytes` in total are required.
    #[error("incomplete message: {needed_bytes} bytes needed")]
    Incomplete {
        /// Total number of bytes the message needs (from the start of the slice).
        needed_bytes: usize,
    },
    /// The magic number is wrong: the stream is not NBD or lost sync.
    #[error("bad magic {found:#x}")]
    BadMagic {
        /// The magic that was found.
        found: u64,
    },
    /// A length field exceeds the configured bound.
    #[error("length {len_bytes} exceeds the limit of {max_bytes} bytes")]
    TooLarge {
        /// The announced length.
        len_bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// The client sent flags this implementation does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// The payload is malformed.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

impl DecodeError {
    /// Whether reading more bytes may turn this into a success.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete { .. })
    }
}

// ---------------------------------------------------------------------------
// Byte helpers (bounds-checked, never panic)
// ---------------------------------------------------------------------------

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Malformed(what))?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError::Malformed(what))?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn string(&mut self, len: usize, what: &'static str) -> Result<String, DecodeError> {
        if len > MAX_STRING_LEN {
            return Err(DecodeError::Malformed(what));
        }
        let bytes = self.take(len, what)?;
        parse_string(bytes, what)
    }

    fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(what))
        }
    }
}

fn parse_string(bytes: &[u8], what: &'static str) -> Result<String, DecodeError> {
    if bytes.len() > MAX_STRING_LEN || bytes.contains(&0) {
        return Err(DecodeError::Malformed(what));
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| DecodeError::Malformed(what))
}

// The fixed-offset readers below are only called after the caller checked that
// `buf` holds the whole fixed-size message, so their slicing cannot fail.
fn be_u16(buf: &[u8], at: usize) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(&buf[at..at + 2]);
    u16::from_be_bytes(b)
}

fn be_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_be_bytes(b)
}

fn be_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Clamps a string to the spec's maximum length (on a char boundary).
fn clamp_str(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// Encodes the newstyle server greeting.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// Decodes a server greeting (client side; used by tests), returning its flags.
pub fn decode_greeting(buf: &[u8]) -> Result<u16, DecodeError> {
    if buf.len() < GREETING_LEN {
        return Err(DecodeError::Incomplete {
            needed_bytes: GREETING_LEN,
        });
    }
    let magic = be_u64(buf, 0);
    if magic != NBD_MAGIC {
        return Err(DecodeError::BadMagic { found: magic });
    }
    let opt = be_u64(buf, 8);
    if opt != IHAVEOPT {
        return Err(DecodeError::BadMagic { found: opt });
    }
    Ok(be_u16(buf, 16))
}

/// Decodes the client flags; unknown bits are an error (the server must close).
pub fn decode_client_flags(buf: &[u8]) -> Result<u32, DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Incomplete { needed_bytes: 4 });
    }
    let flags = be_u32(buf, 0);
    if flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(DecodeError::UnknownClientFlags(flags));
    }
    Ok(flags)
}

/// The fixed part of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`OPT_*`).
    pub option: u32,
    /// Length of the payload that follows.
    pub len_bytes: u32,
}

/// Decodes an option header; a payload longer than `max_payload_bytes` is an error.
pub fn decode_option_header(
    buf: &[u8],
    max_payload_bytes: u32,
) -> Result<OptionHeader, DecodeError> {
    if buf.len() < OPTION_HEADER_LEN {
        return Err(DecodeError::Incomplete {
            needed_bytes: OPTION_HEADER_LEN,
        });
    }
    let magic = be_u64(buf, 0);
    if magic != IHAVEOPT {
        return Err(DecodeError::BadMagic { found: magic });
    }
    let header = OptionHeader {
        option: be_u32(buf, 8),
        len_bytes: be_u32(buf, 12),
    };
    if header.len_bytes > max_payload_bytes {
        return Err(DecodeError::TooLarge {
            len_bytes: u64::from(header.len_bytes),
            max_bytes: u64::from(max_payload_bytes),
        });
    }
    Ok(header)
}

/// Encodes a client option (client side; used by tests and tools).
pub fn encode_option(out: &mut Vec<u8>, option: u32, payload: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len_u32(payload.len()).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Payload of `OPT_INFO` and `OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Information items the client asks for (`INFO_*`).
    pub info_types: Vec<u16>,
}

/// Payload of `OPT_LIST_META_CONTEXT` and `OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name the contexts apply to.
    pub export: String,
    /// Queries (context names or namespace prefixes).
    pub queries: Vec<String>,
}

/// A decoded client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `OPT_EXPORT_NAME`: the payload is the export name.
    ExportName(String),
    /// `OPT_ABORT`.
    Abort,
    /// `OPT_LIST`.
    List,
    /// `OPT_STARTTLS`.
    StartTls,
    /// `OPT_INFO`.
    Info(InfoRequest),
    /// `OPT_GO`.
    Go(InfoRequest),
    /// `OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest),
    /// `OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest),
    /// Any other option code (answered with `REP_ERR_UNSUP`).
    Unknown(u32),
}

fn decode_info_request(payload: &[u8]) -> Result<InfoRequest, DecodeError> {
    let mut r = Reader::new(payload);
    let name_len = r.u32("export name length")? as usize;
    let name = r.string(name_len, "export name")?;
    let count = r.u16("info request count")? as usize;
    // Each item is 2 bytes: the remaining length bounds `count`.
    if payload.len().saturating_sub(r.pos) != count * 2 {
        return Err(DecodeError::Malformed("info request count"));
    }
    let mut info_types = Vec::with_capacity(count);
    for _ in 0..count {
        info_types.push(r.u16("info request")?);
    }
    r.finish("trailing bytes after info requests")?;
    Ok(InfoRequest { name, info_types })
}

fn decode_meta_context_request(payload: &[u8]) -> Result<MetaContextRequest, DecodeError> {
    let mut r = Reader::new(payload);
    let export_len = r.u32("export name length")? as usize;
    let export = r.string(export_len, "export name")?;
    let count = r.u32("query count")? as usize;
    // Each query takes at least 4 bytes: bound `count` before allocating.
    if count > payload.len().saturating_sub(r.pos) / 4 {
        return Err(DecodeError::Malformed("query count"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r.u32("query length")? as usize;
        queries.push(r.string(len, "query")?);
    }
    r.finish("trailing bytes after queries")?;
    Ok(MetaContextRequest { export, queries })
}

fn expect_empty(payload: &[u8], option: ClientOption) -> Result<ClientOption, DecodeError> {
    if payload.is_empty() {
        Ok(option)
    } else {
        Err(DecodeError::Malformed("option takes no payload"))
    }
}

/// Decodes the payload of option `option`.
pub fn decode_option(option: u32, payload: &[u8]) -> Result<ClientOption, DecodeError> {
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(parse_string(
            payload,
            "export name",
        )?)),
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => expect_empty(payload, ClientOption::List),
        OPT_STARTTLS => expect_empty(payload, ClientOption::StartTls),
        OPT_INFO => Ok(ClientOption::Info(decode_info_request(payload)?)),
        OPT_GO => Ok(ClientOption::Go(decode_info_request(payload)?)),
        OPT_STRUCTURED_REPLY => expect_empty(payload, ClientOption::StructuredReply),
        OPT_LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(decode_meta_context_request(
            payload,
        )?)),
        OPT_SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(decode_meta_context_request(
            payload,
        )?)),
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Encodes the payload of `OPT_INFO` / `OPT_GO` (client side).
pub fn encode_info_request(out: &mut Vec<u8>, req: &InfoRequest) {
    let name = clamp_str(&req.name);
    out.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    let count = req.info_types.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&(count as u16).to_be_bytes());
    for t in &req.info_types[..count] {
        out.extend_from_slice(&t.to_be_bytes());
    }
}

/// Encodes the payload of `OPT_LIST/SET_META_CONTEXT` (client side).
pub fn encode_meta_context_request(out: &mut Vec<u8>, req: &MetaContextRequest) {
    let export = clamp_str(&req.export);
    out.extend_from_slice(&len_u32(export.len()).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&len_u32(req.queries.len()).to_be_bytes());
    for q in &req.queries {
        let q = clamp_str(q);
        out.extend_from_slice(&len_u32(q.len()).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
}

/// Encodes an option reply with an arbitrary payload.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len_u32(payload.len()).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Encodes `REP_ACK`.
pub fn encode_rep_ack(out: &mut Vec<u8>, option: u32) {
    encode_option_reply(out, option, REP_ACK, &[]);
}

/// Encodes an error reply (`REP_ERR_*`) with a human-readable message.
pub fn encode_rep_error(out: &mut Vec<u8>, option: u32, error: u32, message: &str) {
    debug_assert!(error & REP_FLAG_ERROR != 0, "not an error reply type");
    encode_option_reply(out, option, error, clamp_str(message).as_bytes());
}

/// Encodes one `REP_SERVER` entry of `OPT_LIST`.
pub fn encode_rep_server(out: &mut Vec<u8>, option: u32, name: &str, description: &str) {
    let name = clamp_str(name);
    let description = clamp_str(description);
    let mut payload = Vec::with_capacity(4 + name.len() + description.len());
    payload.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    payload.extend_from_slice(name.as_bytes());
    payload.extend_from_slice(description.as_bytes());
    encode_option_reply(out, option, REP_SERVER, &payload);
}

/// Encodes `REP_INFO` / `INFO_EXPORT`: size and transmission flags.
pub fn encode_rep_info_export(out: &mut Vec<u8>, option: u32, size_bytes: u64, tflags: u16) {
    let mut payload = [0u8; 12];
    payload[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    payload[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    payload[10..12].copy_from_slice(&tflags.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &payload);
}

/// Encodes `REP_INFO` / `INFO_NAME` or `INFO_DESCRIPTION` (a string item).
pub fn encode_rep_info_string(out: &mut Vec<u8>, option: u32, info_type: u16, text: &str) {
    debug_assert!(info_type == INFO_NAME || info_type == INFO_DESCRIPTION);
    let text = clamp_str(text);
    let mut payload = Vec::with_capacity(2 + text.len());
    payload.extend_from_slice(&info_type.to_be_bytes());
    payload.extend_from_slice(text.as_bytes());
    encode_option_reply(out, option, REP_INFO, &payload);
}

/// Encodes `REP_INFO` / `INFO_BLOCK_SIZE`.
pub fn encode_rep_info_block_size(
    out: &mut Vec<u8>,
    option: u32,
    min_bytes: u32,
    preferred_bytes: u32,
    max_bytes: u32,
) {
    let mut payload = [0u8; 14];
    payload[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    payload[2..6].copy_from_slice(&min_bytes.to_be_bytes());
    payload[6..10].copy_from_slice(&preferred_bytes.to_be_bytes());
    payload[10..14].copy_from_slice(&max_bytes.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &payload);
}

/// Encodes `REP_META_CONTEXT`: a context id and its name.
pub fn encode_rep_meta_context(out: &mut Vec<u8>, option: u32, context_id: u32, name: &str) {
    let name = clamp_str(name);
    let mut payload = Vec::with_capacity(4 + name.len());
    payload.extend_from_slice(&context_id.to_be_bytes());
    payload.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, REP_META_CONTEXT, &payload);
}

/// The fixed part of an option reply (client side; used by tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply_type: u32,
    /// Length of the payload that follows.
    pub len_bytes: u32,
}

/// Decodes an option reply header (client side; used by tests).
pub fn decode_option_reply_header(buf: &[u8]) -> Result<OptionReplyHeader, DecodeError> {
    if buf.len() < OPTION_REPLY_HEADER_LEN {
        return Err(DecodeError::Incomplete {
            needed_bytes: OPTION_REPLY_HEADER_LEN,
        });
    }
    let magic = be_u64(buf, 0);
    if magic != REPLY_MAGIC {
        return Err(DecodeError::BadMagic { found: magic });
    }
    Ok(OptionReplyHeader {
        option: be_u32(buf, 8),
        reply_type: be_u32(buf, 12),
        len_bytes: be_u32(buf, 16),
    })
}

/// Encodes the reply to `OPT_EXPORT_NAME`: size, transmission flags and, unless
/// `no_zeroes`, 124 zero bytes.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size_bytes: u64, tflags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&tflags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_PADDING_LEN]);
    }
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`); unknown values are kept for an `EINVAL` reply.
    pub command: u16,
    /// Opaque cookie (handle) echoed in the reply.
    pub cookie: u64,
    /// Offset in bytes.
    pub offset_bytes: u64,
    /// Length in bytes (of the payload for WRITE).
    pub len_bytes: u32,
}

impl Request {
    /// Number of payload bytes that follow this header on the wire.
    pub fn payload_len(&self) -> usize {
        if self.command == CMD_WRITE {
            self.len_bytes as usize
        } else {
            0
        }
    }

    /// Encodes this request header (client side; used by tests and fuzzing).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset_bytes.to_be_bytes());
        out[24..28].copy_from_slice(&self.len_bytes.to_be_bytes());
        out
    }
}

/// Decodes a request header. A WRITE whose payload exceeds `max_payload_bytes` is
/// [`DecodeError::TooLarge`] (the connection cannot resynchronise cheaply).
pub fn decode_request(buf: &[u8], max_payload_bytes: u32) -> Result<Request, DecodeError> {
    if buf.len() < REQUEST_LEN {
        return Err(DecodeError::Incomplete {
            needed_bytes: REQUEST_LEN,
        });
    }
    let magic = be_u32(buf, 0);
    if magic != REQUEST_MAGIC {
        return Err(DecodeError::BadMagic {
            found: u64::from(magic),
        });
    }
    let req = Request {
        flags: be_u16(buf, 4),
        command: be_u16(buf, 6),
        cookie: be_u64(buf, 8),
        offset_bytes: be_u64(buf, 16),
        len_bytes: be_u32(buf, 24),
    };
    if req.command == CMD_WRITE && req.len_bytes > max_payload_bytes {
        return Err(DecodeError::TooLarge {
            len_bytes: u64::from(req.len_bytes),
            max_bytes: u64::from(max_payload_bytes),
        });
    }
    Ok(req)
}

/// Encodes a simple reply (`error` 0 is success).
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A decoded simple reply (client side; used by tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// NBD error (0 for success).
    pub error: u32,
    /// Cookie of the request.
    pub cookie: u64,
}

/// Decodes a simple reply (client side; used by tests).
pub fn decode_simple_reply(buf: &[u8]) -> Result<SimpleReply, DecodeError> {
    if buf.len() < SIMPLE_REPLY_LEN {
        return Err(DecodeError::Incomplete {
            needed_bytes: SIMPLE_REPLY_LEN,
        });
    }
    let magic = be_u32(buf, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(DecodeError::BadMagic {
            found: u64::from(magic),
        });
    }
    Ok(SimpleReply {
        error: be_u32(buf, 4),
        cookie: be_u64(buf, 8),
    })
}

/// Encodes a structured reply chunk header.
pub fn encode_chunk_header(
    flags: u16,
    reply_type: u16,
    cookie: u64,
    len_bytes: u32,
) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&reply_type.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len_bytes.to_be_bytes());
    out
}

/// Decoded structured chunk header (client side; used by tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Chunk flags (`REPLY_FLAG_*`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub reply_type: u16,
    /// Cookie of the request.
    pub cookie: u64,
    /// Payload length.
    pub len_bytes: u32,
}

/// Decodes a structured chunk header (client side; used by tests).
pub fn decode_chunk_header(buf: &[u8]) -> Result<ChunkHeader, DecodeError> {
    if buf.len() < CHUNK_HEADER_LEN {
        return Err(DecodeError::Incomplete {
            needed_bytes: CHUNK_HEADER_LEN,
        });
    }
    let magic = be_u32(buf, 0);
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(DecodeError::BadMagic {
            found: u64::from(magic),
        });
    }
    Ok(ChunkHeader {
        flags: be_u16(buf, 4),
        reply_type: be_u16(buf, 6),
        cookie: be_u64(buf, 8),
        len_bytes: be_u32(buf, 16),
    })
}

/// Encodes the header of an `OFFSET_DATA` chunk carrying `data_len_bytes` of data;
/// the data itself follows (written separately to avoid a copy).
pub fn encode_offset_data_header(
    flags: u16,
    cookie: u64,
    offset_bytes: u64,
    data_len_bytes: u32,
) -> [u8; OFFSET_DATA_HEADER_LEN] {
    let mut out = [0u8; OFFSET_DATA_HEADER_LEN];
    let len = data_len_bytes.saturating_add(8);
    out[..CHUNK_HEADER_LEN].copy_from_slice(&encode_chunk_header(
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        len,
    ));
    out[CHUNK_HEADER_LEN..].copy_from_slice(&offset_bytes.to_be_bytes());
    out
}

/// Encodes an `OFFSET_HOLE` chunk.
pub fn encode_offset_hole(
    flags: u16,
    cookie: u64,
    offset_bytes: u64,
    hole_len_bytes: u32,
) -> [u8; CHUNK_HEADER_LEN + 12] {
    let mut out = [0u8; CHUNK_HEADER_LEN + 12];
    out[..CHUNK_HEADER_LEN].copy_from_slice(&encode_chunk_header(
        flags,
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    ));
    out[20..28].copy_from_slice(&offset_bytes.to_be_bytes());
    out[28..32].copy_from_slice(&hole_len_bytes.to_be_bytes());
    out
}

/// Encodes a `NONE` chunk with the `DONE` flag: ends a structured reply.
pub fn encode_done(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    encode_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

/// One block status descriptor: a length and `STATE_*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    /// Extent length in bytes.
    pub len_bytes: u32,
    /// `STATE_*` bits.
    pub flags: u32,
}

/// Encodes a `BLOCK_STATUS` chunk for one metadata context.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    flags: u16,
    cookie: u64,
    context_id: u32,
    descriptors: &[BlockDescriptor],
) {
    let len = 4usize.saturating_add(descriptors.len().saturating_mul(8));
    out.extend_from_slice(&encode_chunk_header(
        flags,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len_u32(len),
    ));
    out.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.len_bytes.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
}

/// Encodes an `ERROR` chunk (`error` must be non-zero).
pub fn encode_error_chunk(out: &mut Vec<u8>, flags: u16, cookie: u64, error: u32, message: &str) {
    debug_assert!(error != 0, "an error chunk carries a non-zero error");
    let message = clamp_str(message);
    let len = 6 + message.len();
    out.extend_from_slice(&encode_chunk_header(
        flags,
        REPLY_TYPE_ERROR,
        cookie,
        len_u32(len),
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Encodes an `ERROR_OFFSET` chunk: an error at `offset_bytes` of a read.
pub fn encode_error_offset_chunk(
    out: &mut Vec<u8>,
    flags: u16,
    cookie: u64,
    error: u32,
    message: &str,
    offset_bytes: u64,
) {
    debug_assert!(error != 0, "an error chunk carries a non-zero error");
    let message = clamp_str(message);
    let len = 6 + message.len() + 8;
    out.extend_from_slice(&encode_chunk_header(
        flags,
        REPLY_TYPE_ERROR_OFFSET,
        cookie,
        len_u32(len),
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out.extend_from_slice(&offset_bytes.to_be_bytes());
}

/// Maps a Linux errno value to the nearest NBD wire error (`EIO` when no better).
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        1 | 13 | 30 => NBD_EPERM,    // EPERM, EACCES, EROFS
        12 => NBD_ENOMEM,            // ENOMEM
        22 => NBD_EINVAL,            // EINVAL
        27 | 28 | 122 => NBD_ENOSPC, // EFBIG, ENOSPC, EDQUOT
        75 => NBD_EOVERFLOW,         // EOVERFLOW
        95 | 38 => NBD_ENOTSUP,      // EOPNOTSUPP, ENOSYS
        108 => NBD_ESHUTDOWN,        // ESHUTDOWN
        _ => NBD_EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_roundtrip() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(decode_greeting(&g), Ok(3));
        assert!(decode_greeting(&g[..5]).is_err_and(|e| e.is_incomplete()));
    }

    #[test]
    fn client_flags() {
        assert_eq!(decode_client_flags(&3u32.to_be_bytes()), Ok(3));
        assert_eq!(
            decode_client_flags(&4u32.to_be_bytes()),
            Err(DecodeError::UnknownClientFlags(4))
        );
        assert!(decode_client_flags(&[0, 0]).is_err_and(|e| e.is_incomplete()));
    }

    #[test]
    fn option_header_checks() {
        let mut buf = Vec::new();
        encode_option(&mut buf, OPT_GO, &[1, 2, 3]);
        let h = decode_option_header(&buf, 16).unwrap();
        assert_eq!(
            h,
            OptionHeader {
                option: OPT_GO,
                len_bytes: 3
            }
        );
        assert_eq!(
            decode_option_header(&buf, 2),
            Err(DecodeError::TooLarge {
                len_bytes: 3,
                max_bytes: 2
            })
        );
        buf[0] ^= 1;
        assert!(matches!(
            decode_option_header(&buf, 16),
            Err(DecodeError::BadMagic { .. })
        ));
        assert!(decode_option_header(&buf[..15], 16).is_err_and(|e| e.is_incomplete()));
    }

    #[test]
    fn go_roundtrip() {
        let req = InfoRequest {
            name: "disk0".into(),
            info_types: vec![INFO_NAME, INFO_BLOCK_SIZE],
        };
        let mut payload = Vec::new();
        encode_info_request(&mut payload, &req);
        assert_eq!(
            decode_option(OPT_GO, &payload),
            Ok(ClientOption::Go(req.clone()))
        );
        assert_eq!(
            decode_option(OPT_INFO, &payload),
            Ok(ClientOption::Info(req))
        );
        // Truncations and extensions are all malformed, never a panic.
        for cut in 0..payload.len() {
            assert!(decode_option(OPT_GO, &payload[..cut]).is_err());
        }
        payload.push(0);
        assert!(decode_option(OPT_GO, &payload).is_err());
    }

    #[test]
    fn meta_context_roundtrip() {
        let req = MetaContextRequest {
            export: String::new(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
        };
        let mut payload = Vec::new();
        encode_meta_context_request(&mut payload, &req);
        assert_eq!(
            decode_option(OPT_SET_META_CONTEXT, &payload),
            Ok(ClientOption::SetMetaContext(req.clone()))
        );
        for cut in 0..payload.len() {
            assert!(decode_option(OPT_LIST_META_CONTEXT, &payload[..cut]).is_err());
        }
        // A huge query count with no bytes behind it is rejected before allocating.
        let mut bad = vec![0, 0, 0, 0];
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode_option(OPT_SET_META_CONTEXT, &bad),
            Err(DecodeError::Malformed("query count"))
        );
    }

    #[test]
    fn simple_options() {
        assert_eq!(
            decode_option(OPT_EXPORT_NAME, b"abc"),
            Ok(ClientOption::ExportName("abc".into()))
        );
        assert!(decode_option(OPT_EXPORT_NAME, &[0xff]).is_err());
        assert!(decode_option(OPT_EXPORT_NAME, b"a\0b").is_err());
        assert_eq!(decode_option(OPT_LIST, &[]), Ok(ClientOption::List));
        assert!(decode_option(OPT_LIST, &[1]).is_err());
        assert_eq!(decode_option(OPT_ABORT, &[]), Ok(ClientOption::Abort));
        assert_eq!(
            decode_option(OPT_STRUCTURED_REPLY, &[]),
            Ok(ClientOption::StructuredReply)
        );
        assert_eq!(decode_option(OPT_STARTTLS, &[]), Ok(ClientOption::StartTls));
        assert_eq!(decode_option(99, &[1, 2]), Ok(ClientOption::Unknown(99)));
    }

    #[test]
    fn option_replies() {
        let mut out = Vec::new();
        encode_rep_info_export(&mut out, OPT_GO, 1 << 30, TFLAG_HAS_FLAGS);
        let h = decode_option_reply_header(&out).unwrap();
        assert_eq!(
            h,
            OptionReplyHeader {
                option: OPT_GO,
                reply_type: REP_INFO,
                len_bytes: 12
            }
        );
        assert_eq!(&out[20..22], &[0, 0]);
        assert_eq!(be_u64(&out, 22), 1 << 30);
        assert_eq!(be_u16(&out, 30), TFLAG_HAS_FLAGS);

        out.clear();
        encode_rep_error(&mut out, OPT_GO, REP_ERR_POLICY, "no");
        let h = decode_option_reply_header(&out).unwrap();
        assert_eq!(h.reply_type, REP_ERR_POLICY);
        assert_eq!(&out[20..], b"no");

        out.clear();
        encode_rep_server(&mut out, OPT_LIST, "a", "desc");
        assert_eq!(&out[20..], &[0, 0, 0, 1, b'a', b'd', b'e', b's', b'c']);

        out.clear();
        encode_rep_info_block_size(&mut out, OPT_GO, 1, 4096, 1 << 25);
        assert_eq!(out.len(), 20 + 14);
        assert_eq!(be_u32(&out, 26), 4096);

        out.clear();
        encode_rep_meta_context(&mut out, OPT_SET_META_CONTEXT, 7, META_BASE_ALLOCATION);
        assert_eq!(be_u32(&out, 20), 7);
        assert_eq!(&out[24..], b"base:allocation");

        out.clear();
        encode_export_name_reply(&mut out, 10, 1, false);
        assert_eq!(out.len(), 8 + 2 + 124);
        out.clear();
        encode_export_name_reply(&mut out, 10, 1, true);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn request_roundtrip_and_bounds() {
        let req = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0xdead_beef,
            offset_bytes: 4096,
            len_bytes: 512,
        };
        let buf = req.encode();
        assert_eq!(decode_request(&buf, 1024), Ok(req));
        assert_eq!(req.payload_len(), 512);
        assert_eq!(
            decode_request(&buf, 100),
            Err(DecodeError::TooLarge {
                len_bytes: 512,
                max_bytes: 100
            })
        );
        // A READ of any length decodes; the server answers EINVAL if too large.
        let read = Request {
            command: CMD_READ,
            ..req
        };
        assert_eq!(decode_request(&read.encode(), 100), Ok(read));
        assert_eq!(read.payload_len(), 0);
        assert_eq!(
            decode_request(&buf[..27], 1024),
            Err(DecodeError::Incomplete { needed_bytes: 28 })
        );
        let mut bad = buf;
        bad[0] = 0;
        assert!(matches!(
            decode_request(&bad, 1024),
            Err(DecodeError::BadMagic { .. })
        ));
    }

    #[test]
    fn replies() {
        let r = encode_simple_reply(NBD_EINVAL, 42);
        assert_eq!(
            decode_simple_reply(&r),
            Ok(SimpleReply {
                error: 22,
                cookie: 42
            })
        );
        let h = encode_offset_data_header(REPLY_FLAG_DONE, 9, 4096, 512);
        let c = decode_chunk_header(&h).unwrap();
        assert_eq!(c.reply_type, REPLY_TYPE_OFFSET_DATA);
        assert_eq!(c.len_bytes, 520);
        assert_eq!(be_u64(&h, 20), 4096);

        let hole = encode_offset_hole(0, 9, 0, 100);
        assert_eq!(decode_chunk_header(&hole).unwrap().len_bytes, 12);

        let d = encode_done(9);
        let c = decode_chunk_header(&d).unwrap();
        assert_eq!((c.flags, c.reply_type, c.len_bytes), (1, 0, 0));

        let mut out = Vec::new();
        encode_block_status(
            &mut out,
            REPLY_FLAG_DONE,
            9,
            1,
            &[
                BlockDescriptor {
                    len_bytes: 4096,
                    flags: 0,
                },
                BlockDescriptor {
                    len_bytes: 8192,
                    flags: STATE_HOLE | STATE_ZERO,
                },
            ],
        );
        let c = decode_chunk_header(&out).unwrap();
        assert_eq!(c.len_bytes, 4 + 16);
        assert_eq!(out.len(), 20 + 20);
        assert_eq!(be_u32(&out, 36), 3);

        out.clear();
        encode_error_chunk(&mut out, REPLY_FLAG_DONE, 9, NBD_EIO, "bad");
        let c = decode_chunk_header(&out).unwrap();
        assert_eq!(c.reply_type, REPLY_TYPE_ERROR);
        assert_eq!(c.len_bytes, 9);
        assert_eq!(be_u32(&out, 20), 5);

        out.clear();
        encode_error_offset_chunk(&mut out, 0, 9, NBD_EIO, "bad", 77);
        let c = decode_chunk_header(&out).unwrap();
        assert_eq!(c.reply_type, REPLY_TYPE_ERROR_OFFSET);
        assert_eq!(c.len_bytes, 17);
        assert_eq!(be_u64(&out, 29), 77);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno_to_nbd(30), NBD_EPERM);
        assert_eq!(errno_to_nbd(122), NBD_ENOSPC);
        assert_eq!(errno_to_nbd(95), NBD_ENOTSUP);
        assert_eq!(errno_to_nbd(108), NBD_ESHUTDOWN);
        assert_eq!(errno_to_nbd(4), NBD_EIO);
    }

    #[test]
    fn long_strings_are_clamped() {
        let long = "é".repeat(3000); // 6000 bytes, 2-byte chars
        let mut out = Vec::new();
        encode_rep_error(&mut out, OPT_GO, REP_ERR_POLICY, &long);
        let h = decode_option_reply_header(&out).unwrap();
        assert!(h.len_bytes as usize <= MAX_STRING_LEN);
        assert!(std::str::from_utf8(&out[20..]).is_ok());
    }

    #[test]
    fn random_bytes_never_panic() {
        // Deterministic xorshift: the same property the fuzz targets check.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && len >= 4 {
                buf[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            if let Ok(req) = decode_request(&buf, DEFAULT_MAX_REQUEST_BYTES) {
                assert_eq!(&req.encode()[..], &buf[..REQUEST_LEN]);
            }
            for option in [
                OPT_GO,
                OPT_INFO,
                OPT_SET_META_CONTEXT,
                OPT_LIST_META_CONTEXT,
                OPT_EXPORT_NAME,
            ] {
                let _ = decode_option(option, &buf);
            }
            let _ = decode_option_header(&buf, DEFAULT_MAX_OPTION_BYTES);
            let _ = decode_chunk_header(&buf);
            let _ = decode_simple_reply(&buf);
            let _ = decode_option_reply_header(&buf);
            let _ = decode_greeting(&buf);
            let _ = decode_client_flags(&buf);
        }
    }
}
