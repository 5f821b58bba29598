//! Frame splitting for the post-startup protocol: `tag`, `len`, body.
//!
//! A frame keeps the raw bytes of the whole message (tag and length
//! included) so that forwarding it is handing the same buffer on; nothing
//! on the hot path re-encodes a message it does not need to change.

use bytes::{Buf, BytesMut};

/// The header is a one-byte tag and a four-byte length that counts itself.
pub const HEADER_LEN: usize = 5;

/// One protocol message, as it arrived.
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    /// The whole message: tag, length and body.
    pub raw: BytesMut,
}

impl Frame {
    /// The message body, after the tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {0}")]
    BadLength(i32),
    #[error("message of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
}

/// Splits the next complete frame off the front of `buf`.
///
/// `Ok(None)` means more bytes are needed; the buffer is left untouched.
/// The length is checked before waiting for the body, so a peer that
/// announces a huge message is refused without buffering it.
pub fn split_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let declared = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if declared < 4 {
        return Err(FrameError::BadLength(declared));
    }
    let total = declared as usize + 1;
    if total > max_len {
        return Err(FrameError::TooLarge(total, max_len));
    }
    if buf.len() < total {
        // Reserve once for the whole message so a large DataRow or CopyData
        // is read without repeated reallocation.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        tag,
        raw: buf.split_to(total),
    }))
}

/// Reads a NUL-terminated string from the front of `body`, advancing it.
pub fn get_cstr<'a>(body: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = body.iter().position(|&b| b == 0)?;
    let s = &body[..end];
    body.advance(end + 1);
    Some(s)
}

/// Reads a big-endian i16 from the front of `body`, advancing it.
pub fn get_i16(body: &mut &[u8]) -> Option<i16> {
    if body.len() < 2 {
        return None;
    }
    Some(body.get_i16())
}

/// Reads a big-endian i32 from the front of `body`, advancing it.
pub fn get_i32(body: &mut &[u8]) -> Option<i32> {
    if body.len() < 4 {
        return None;
    }
    Some(body.get_i32())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_whole_frames_and_waits_for_partial_ones() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x09abcd\0Q\0\0"[..]);
        let frame = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(frame.tag, b'Q');
        assert_eq!(frame.body(), b"abcd\0");
        assert!(split_frame(&mut buf, 1024).unwrap().is_none());
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn rejects_lying_and_oversized_lengths() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        assert!(matches!(
            split_frame(&mut buf, 1024),
            Err(FrameError::BadLength(2))
        ));
        let mut buf = BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]);
        assert!(matches!(
            split_frame(&mut buf, 1024),
            Err(FrameError::TooLarge(_, 1024))
        ));
    }
}
