//! Typed views of the messages pgstash inspects, and builders for the ones
//! it writes itself. Encoding of the standard backend messages is pgwire's.

use bytes::{BufMut, BytesMut};
use pgwire::error::ErrorInfo;
use pgwire::messages::response::{ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::Message;

use super::frame::{get_cstr, get_i16, get_i32, HEADER_LEN};

// Frontend tags.
pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const CLOSE: u8 = b'C';
pub const FUNCTION_CALL: u8 = b'F';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const TERMINATE: u8 = b'X';

// Backend tags.
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const NOTIFICATION: u8 = b'A';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const DATA_ROW: u8 = b'D';
pub const ERROR_RESPONSE: u8 = b'E';
pub const COPY_IN: u8 = b'G';
pub const COPY_OUT: u8 = b'H';
pub const EMPTY_QUERY: u8 = b'I';
pub const NOTICE: u8 = b'N';
pub const PARAMETER_STATUS: u8 = b'S';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const COPY_BOTH: u8 = b'W';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const NO_DATA: u8 = b'n';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const PARAMETER_DESCRIPTION: u8 = b't';

/// Whether a frontend tag is one the protocol defines after startup.
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        QUERY
            | PARSE
            | BIND
            | DESCRIBE
            | EXECUTE
            | SYNC
            | FLUSH
            | CLOSE
            | FUNCTION_CALL
            | COPY_DATA
            | COPY_DONE
            | COPY_FAIL
            | TERMINATE
    )
}

/// Error severities as Postgres spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Appends an ErrorResponse with the given SQLSTATE.
pub fn error_response(out: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    let info = ErrorInfo::new(
        severity.as_str().to_owned(),
        code.to_owned(),
        message.to_owned(),
    );
    encode(out, &ErrorResponse::from(info));
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    encode(out, &ReadyForQuery::new(status));
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    encode(
        out,
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
    );
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    encode(out, &BackendKeyData::new(pid, SecretKey::I32(secret)));
}

pub fn authentication_ok(out: &mut BytesMut) {
    out.put_u8(b'R');
    out.put_i32(8);
    out.put_i32(0);
}

/// A message with no body: ParseComplete, BindComplete, CloseComplete, NoData.
pub fn empty_message(out: &mut BytesMut, tag: u8) {
    out.put_u8(tag);
    out.put_i32(4);
}

pub fn command_complete(out: &mut BytesMut, command_tag: &str) {
    out.put_u8(COMMAND_COMPLETE);
    out.put_i32(4 + command_tag.len() as i32 + 1);
    out.put_slice(command_tag.as_bytes());
    out.put_u8(0);
}

fn encode<M: Message>(out: &mut BytesMut, message: &M) {
    // Encoding into a BytesMut cannot fail for these fixed-shape messages.
    if let Err(e) = message.encode(out) {
        tracing::error!(error = %e, "encoding a backend message failed");
    }
}

/// The statement text of a Query message.
pub fn query_text(body: &[u8]) -> Option<&str> {
    let mut body = body;
    std::str::from_utf8(get_cstr(&mut body)?).ok()
}

/// A Parse message: statement name, query text, parameter type OIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    pub param_types: Vec<u32>,
}

impl<'a> Parse<'a> {
    pub fn decode(body: &'a [u8]) -> Option<Self> {
        let mut body = body;
        let name = get_cstr(&mut body)?;
        let query = get_cstr(&mut body)?;
        let count = get_i16(&mut body)?;
        if count < 0 {
            return None;
        }
        let mut param_types = Vec::with_capacity(count as usize);
        for _ in 0..count {
            param_types.push(get_i32(&mut body)? as u32);
        }
        Some(Parse {
            name,
            query,
            param_types,
        })
    }

    /// Encodes this Parse under another statement name.
    pub fn encode_named(&self, name: &[u8], out: &mut BytesMut) {
        let len = 4 + name.len() + 1 + self.query.len() + 1 + 2 + 4 * self.param_types.len();
        out.put_u8(PARSE);
        out.put_i32(len as i32);
        put_cstr(out, name);
        put_cstr(out, self.query);
        out.put_i16(self.param_types.len() as i16);
        for oid in &self.param_types {
            out.put_u32(*oid);
        }
    }
}

/// The names at the front of a Bind message; the rest is kept as bytes.
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// Parameter formats, values and result formats, untouched.
    pub rest: &'a [u8],
}

impl<'a> Bind<'a> {
    pub fn decode(body: &'a [u8]) -> Option<Self> {
        let mut body = body;
        let portal = get_cstr(&mut body)?;
        let statement = get_cstr(&mut body)?;
        Some(Bind {
            portal,
            statement,
            rest: body,
        })
    }

    pub fn encode_with_statement(&self, statement: &[u8], out: &mut BytesMut) {
        let len = 4 + self.portal.len() + 1 + statement.len() + 1 + self.rest.len();
        out.put_u8(BIND);
        out.put_i32(len as i32);
        put_cstr(out, self.portal);
        put_cstr(out, statement);
        out.put_slice(self.rest);
    }
}

/// Describe and Close share a shape: 'S' or 'P', then a name.
pub struct Target<'a> {
    pub kind: u8,
    pub name: &'a [u8],
}

impl<'a> Target<'a> {
    pub fn decode(body: &'a [u8]) -> Option<Self> {
        let (&kind, mut rest) = body.split_first()?;
        if kind != b'S' && kind != b'P' {
            return None;
        }
        let name = get_cstr(&mut rest)?;
        Some(Target { kind, name })
    }

    pub fn encode(&self, tag: u8, name: &[u8], out: &mut BytesMut) {
        out.put_u8(tag);
        out.put_i32((4 + 1 + name.len() + 1) as i32);
        out.put_u8(self.kind);
        put_cstr(out, name);
    }
}

fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

/// The SQLSTATE and message of an ErrorResponse body, for logs.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        rest = tail;
        let Some(value) = get_cstr(&mut rest) else {
            break;
        };
        match field {
            b'C' => code = String::from_utf8_lossy(value).into_owned(),
            b'M' => message = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// Splits a ParameterStatus body into name and value.
pub fn parameter_status_fields(body: &[u8]) -> Option<(String, String)> {
    let mut body = body;
    let name = get_cstr(&mut body)?;
    let value = get_cstr(&mut body)?;
    Some((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// The transaction status byte of a ReadyForQuery frame.
pub fn ready_status(raw: &[u8]) -> u8 {
    raw.get(HEADER_LEN).copied().unwrap_or(b'I')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_under_a_new_name() {
        let mut original = BytesMut::new();
        let p = Parse {
            name: b"s1",
            query: b"select $1",
            param_types: vec![23],
        };
        p.encode_named(b"s1", &mut original);
        let decoded = Parse::decode(&original[HEADER_LEN..]).unwrap();
        assert_eq!(decoded, p);
        let mut renamed = BytesMut::new();
        decoded.encode_named(b"pgstash_x", &mut renamed);
        let again = Parse::decode(&renamed[HEADER_LEN..]).unwrap();
        assert_eq!(again.name, b"pgstash_x");
        assert_eq!(again.query, b"select $1");
    }

    #[test]
    fn error_response_carries_sqlstate() {
        let mut out = BytesMut::new();
        error_response(&mut out, Severity::Error, "08P01", "bad");
        assert_eq!(out[0], ERROR_RESPONSE);
        let (code, message) = error_fields(&out[HEADER_LEN..]);
        assert_eq!((code.as_str(), message.as_str()), ("08P01", "bad"));
    }
}
