//! The untagged packets a client may send before the regular protocol:
//! SSLRequest, GSSENCRequest, CancelRequest and the StartupMessage.

use std::collections::BTreeMap;

use bytes::{Buf, BytesMut};
use pgwire::messages::startup::Startup;
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};

/// Postgres refuses startup packets larger than this (pqcomm.h).
pub const MAX_STARTUP_PACKET: usize = 10_000;

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
const PROTOCOL_3_MAJOR: i32 = 3;

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
    Startup(BTreeMap<String, String>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid length of startup packet")]
    BadLength,
    #[error("unsupported frontend protocol {0}.{1}: server supports 3.0 to 3.0")]
    UnsupportedProtocol(u16, u16),
    #[error("invalid startup packet layout")]
    Malformed,
}

/// Splits one startup-phase packet off `buf`; `Ok(None)` means wait for more.
pub fn split_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, StartupError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(StartupError::BadLength);
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    let code = i32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]);
    match code {
        SSL_REQUEST if len == 8 => Ok(Some(StartupPacket::SslRequest)),
        GSSENC_REQUEST if len == 8 => Ok(Some(StartupPacket::GssEncRequest)),
        CANCEL_REQUEST if len == 16 => {
            packet.advance(4);
            let pid = packet.get_i32();
            let secret = packet.get_i32();
            Ok(Some(StartupPacket::Cancel { pid, secret }))
        }
        _ if code >> 16 == PROTOCOL_3_MAJOR => {
            if packet.last() != Some(&0) {
                return Err(StartupError::Malformed);
            }
            let ctx = DecodeContext::new(ProtocolVersion::default());
            let startup = Startup::decode_body(&mut packet, len, &ctx)
                .map_err(|_| StartupError::Malformed)?;
            Ok(Some(StartupPacket::Startup(startup.parameters)))
        }
        _ => Err(StartupError::UnsupportedProtocol(
            (code >> 16) as u16,
            (code & 0xffff) as u16,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn packet(code: i32, body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_i32(8 + body.len() as i32);
        buf.put_i32(code);
        buf.put_slice(body);
        buf
    }

    #[test]
    fn recognises_each_packet() {
        assert_eq!(
            split_startup(&mut packet(SSL_REQUEST, b"")).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        let mut cancel = packet(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(
            split_startup(&mut cancel).unwrap(),
            Some(StartupPacket::Cancel { pid: 7, secret: 9 })
        );
        let mut startup = packet(196608, b"user\0bob\0database\0db\0\0");
        let Some(StartupPacket::Startup(params)) = split_startup(&mut startup).unwrap() else {
            panic!("not a startup message");
        };
        assert_eq!(params["user"], "bob");
        assert_eq!(params["database"], "db");
    }

    #[test]
    fn refuses_garbage() {
        let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(split_startup(&mut garbage).is_err());
        let mut old = packet(2 << 16, b"\0");
        assert_eq!(
            split_startup(&mut old),
            Err(StartupError::UnsupportedProtocol(2, 0))
        );
    }
}
