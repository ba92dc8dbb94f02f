//! NBD handshake: fixed newstyle option haggling up to the transmission phase.
//!
//! Owns the server side of the option phase: greeting, client flags, and the options
//! EXPORT_NAME, ABORT, LIST, STARTTLS (refused), INFO, GO, STRUCTURED_REPLY,
//! LIST_META_CONTEXT and SET_META_CONTEXT (`base:allocation` only). Every reply is
//! encoded into one buffer and written with one `write_all`.

use rdb_protocol::nbd::{self as proto, ClientOption, InfoRequest, MetaContextRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ConnContext, ConnError, ExportInfo, ExportLookup};

/// Context id of `base:allocation` after `SET_META_CONTEXT`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;
/// Smallest block size advertised (byte-granular access is fine).
const MIN_BLOCK_BYTES: u32 = 1;
/// Preferred block size advertised.
const PREFERRED_BLOCK_BYTES: u32 = 4096;

/// What the handshake settled for the transmission phase.
pub(crate) struct Session {
    /// The export being served.
    pub(crate) export: ExportInfo,
    /// Structured replies were negotiated.
    pub(crate) structured: bool,
    /// `base:allocation` was selected for this export.
    pub(crate) base_allocation: bool,
}

/// State accumulated over the options of one connection.
#[derive(Default)]
struct Negotiation {
    no_zeroes: bool,
    structured: bool,
    /// Export name `base:allocation` was selected for by SET_META_CONTEXT.
    meta_export: Option<String>,
}

/// Transmission flags for `export` given what was negotiated.
pub(crate) fn transmission_flags(export: &ExportInfo, structured: bool) -> u16 {
    let mut flags = proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_FUA
        | proto::TFLAG_SEND_TRIM
        | proto::TFLAG_SEND_WRITE_ZEROES
        | proto::TFLAG_SEND_CACHE;
    if structured {
        // Reads are always answered with a single data chunk.
        flags |= proto::TFLAG_SEND_DF;
    }
    if export.device.flush_covers_all_handles() {
        flags |= proto::TFLAG_CAN_MULTI_CONN;
    }
    if export.read_only {
        flags |= proto::TFLAG_READ_ONLY;
    }
    flags
}

/// Runs the handshake. `Ok(None)` means the client ended it (ABORT, EOF, or an
/// EXPORT_NAME that cannot be served, after which the spec requires a close).
pub(crate) async fn negotiate<R, W>(
    ctx: &ConnContext,
    rd: &mut R,
    wr: &mut W,
) -> Result<Option<Session>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&proto::encode_greeting(
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
    ))
    .await?;
    wr.flush().await?;

    let mut flags_buf = [0u8; 4];
    if !read_or_eof(rd, &mut flags_buf).await? {
        return Ok(None);
    }
    let client_flags = proto::decode_client_flags(&flags_buf)?;
    let mut state = Negotiation {
        no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
        ..Negotiation::default()
    };

    let mut out = Vec::with_capacity(1024);
    for _ in 0..ctx.limits.max_options_per_conn {
        let mut header_buf = [0u8; proto::OPTION_HEADER_LEN];
        if !read_or_eof(rd, &mut header_buf).await? {
            return Ok(None);
        }
        let header = proto::decode_option_header(&header_buf, ctx.limits.max_option_bytes)?;
        let mut payload = vec![0u8; header.len_bytes as usize];
        rd.read_exact(&mut payload).await?;

        out.clear();
        let step = handle_option(ctx, &mut state, header.option, &payload, &mut out);
        if !out.is_empty() {
            wr.write_all(&out).await?;
            wr.flush().await?;
        }
        match step {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Transmit(session) => return Ok(Some(session)),
        }
    }
    Err(ConnError::TooManyOptions)
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
async fn read_or_eof<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut [u8]) -> Result<bool, ConnError> {
    match rd.read_exact(buf).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e.into()),
    }
}

enum Step {
    Continue,
    Close,
    Transmit(Session),
}

fn handle_option(
    ctx: &ConnContext,
    state: &mut Negotiation,
    option: u32,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Step {
    let decoded = match proto::decode_option(option, payload) {
        Ok(decoded) => decoded,
        Err(e) => {
            if option == proto::OPT_EXPORT_NAME {
                // EXPORT_NAME has no error reply: the only answer is to close.
                return Step::Close;
            }
            proto::encode_rep_error(out, option, proto::REP_ERR_INVALID, &e.to_string());
            return Step::Continue;
        }
    };
    tracing::debug!(option, "nbd option");
    match decoded {
        ClientOption::ExportName(name) => match ctx.resolver.lookup(&name) {
            ExportLookup::Found(export) => {
                let tflags = transmission_flags(&export, state.structured);
                proto::encode_export_name_reply(
                    out,
                    export.device.size_bytes(),
                    tflags,
                    state.no_zeroes,
                );
                let base_allocation = state.meta_export.as_deref() == Some(name.as_str());
                Step::Transmit(Session {
                    export,
                    structured: state.structured,
                    base_allocation,
                })
            }
            ExportLookup::Refused { message } => {
                tracing::info!(export = %name, %message, "nbd export refused (EXPORT_NAME)");
                Step::Close
            }
            ExportLookup::Unknown => {
                tracing::info!(export = %name, "nbd unknown export (EXPORT_NAME)");
                Step::Close
            }
        },
        ClientOption::Abort => {
            proto::encode_rep_ack(out, option);
            Step::Close
        }
        ClientOption::List => {
            for name in ctx.resolver.list() {
                let description = match ctx.resolver.lookup(&name) {
                    ExportLookup::Found(export) => export.description,
                    ExportLookup::Refused { .. } | ExportLookup::Unknown => String::new(),
                };
                proto::encode_rep_server(out, option, &name, &description);
            }
            proto::encode_rep_ack(out, option);
            Step::Continue
        }
        ClientOption::StartTls => {
            proto::encode_rep_error(
                out,
                option,
                proto::REP_ERR_UNSUP,
                "TLS is not supported by this server",
            );
            Step::Continue
        }
        ClientOption::Info(req) => {
            info_or_go(ctx, state, option, &req, out);
            Step::Continue
        }
        ClientOption::Go(req) => match info_or_go(ctx, state, option, &req, out) {
            Some(export) => {
                let base_allocation = state.meta_export.as_deref() == Some(req.name.as_str());
                Step::Transmit(Session {
                    export,
                    structured: state.structured,
                    base_allocation,
                })
            }
            None => Step::Continue,
        },
        ClientOption::StructuredReply => {
            state.structured = true;
            proto::encode_rep_ack(out, option);
            Step::Continue
        }
        ClientOption::ListMetaContext(req) => {
            meta_context(ctx, state, option, &req, false, out);
            Step::Continue
        }
        ClientOption::SetMetaContext(req) => {
            meta_context(ctx, state, option, &req, true, out);
            Step::Continue
        }
        ClientOption::Unknown(code) => {
            proto::encode_rep_error(
                out,
                option,
                proto::REP_ERR_UNSUP,
                &format!("option {code} is not supported"),
            );
            Step::Continue
        }
    }
}

/// Looks the export up and encodes the reply to INFO/GO; returns the export on success.
fn lookup_or_error(
    ctx: &ConnContext,
    option: u32,
    name: &str,
    out: &mut Vec<u8>,
) -> Option<ExportInfo> {
    match ctx.resolver.lookup(name) {
        ExportLookup::Found(export) => Some(export),
        ExportLookup::Refused { message } => {
            proto::encode_rep_error(out, option, proto::REP_ERR_POLICY, &message);
            None
        }
        ExportLookup::Unknown => {
            proto::encode_rep_error(
                out,
                option,
                proto::REP_ERR_UNKNOWN,
                &format!("unknown export {name:?}"),
            );
            None
        }
    }
}

fn info_or_go(
    ctx: &ConnContext,
    state: &Negotiation,
    option: u32,
    req: &InfoRequest,
    out: &mut Vec<u8>,
) -> Option<ExportInfo> {
    let export = lookup_or_error(ctx, option, &req.name, out)?;
    let tflags = transmission_flags(&export, state.structured);
    proto::encode_rep_info_export(out, option, export.device.size_bytes(), tflags);
    if req.info_types.contains(&proto::INFO_NAME) {
        proto::encode_rep_info_string(out, option, proto::INFO_NAME, &export.name);
    }
    if req.info_types.contains(&proto::INFO_DESCRIPTION) && !export.description.is_empty() {
        proto::encode_rep_info_string(out, option, proto::INFO_DESCRIPTION, &export.description);
    }
    // Minimum 1 imposes no constraint, so sending it unrequested is harmless.
    proto::encode_rep_info_block_size(
        out,
        option,
        MIN_BLOCK_BYTES,
        PREFERRED_BLOCK_BYTES,
        ctx.limits.max_request_bytes,
    );
    proto::encode_rep_ack(out, option);
    Some(export)
}

fn meta_context(
    ctx: &ConnContext,
    state: &mut Negotiation,
    option: u32,
    req: &MetaContextRequest,
    set: bool,
    out: &mut Vec<u8>,
) {
    if !state.structured {
        proto::encode_rep_error(
            out,
            option,
            proto::REP_ERR_INVALID,
            "metadata contexts need structured replies (NBD_OPT_STRUCTURED_REPLY) first",
        );
        return;
    }
    if lookup_or_error(ctx, option, &req.export, out).is_none() {
        return;
    }
    let matches = if req.queries.is_empty() {
        // LIST with no query lists everything; SET with no query selects nothing.
        !set
    } else {
        req.queries
            .iter()
            .any(|q| q == proto::META_BASE_ALLOCATION || (!set && q == "base:"))
    };
    if set {
        state.meta_export = matches.then(|| req.export.clone());
    }
    if matches {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        proto::encode_rep_meta_context(out, option, id, proto::META_BASE_ALLOCATION);
    }
    proto::encode_rep_ack(out, option);
}
