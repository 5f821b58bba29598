//! Batches outgoing frames and writes them with as few syscalls as possible.
//!
//! Frames split from one read buffer sit next to each other in memory; the
//! outbox glues such neighbours back together (an O(1) `unsplit`) so a
//! response of a thousand DataRows is written as one slice, not copied.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Bytes to write: frames relayed or composed (mutable, mergeable), or a
/// stored result shared with the cache.
enum Chunk {
    Owned(BytesMut),
    Shared(Bytes),
}

impl std::ops::Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Owned(b) => b,
            Chunk::Shared(b) => b,
        }
    }
}

impl Chunk {
    fn advance(&mut self, n: usize) {
        match self {
            Chunk::Owned(b) => b.advance(n),
            Chunk::Shared(b) => b.advance(n),
        }
    }
}

#[derive(Default)]
pub struct Outbox {
    chunks: Vec<Chunk>,
    len: usize,
}

impl Outbox {
    pub fn push(&mut self, raw: BytesMut) {
        self.len += raw.len();
        if let Some(Chunk::Owned(last)) = self.chunks.last_mut() {
            // Only contiguous neighbours are merged: `unsplit` of unrelated
            // buffers would silently copy the second one.
            let contiguous = last.as_ptr().wrapping_add(last.len()) == raw.as_ptr();
            if contiguous {
                last.unsplit(raw);
                return;
            }
        }
        self.chunks.push(Chunk::Owned(raw));
    }

    /// Appends shared bytes (a cached result) without copying them.
    pub fn push_shared(&mut self, bytes: Bytes) {
        self.len += bytes.len();
        self.chunks.push(Chunk::Shared(bytes));
    }

    /// Appends bytes the proxy composed itself.
    pub fn push_slice(&mut self, bytes: &[u8]) {
        self.push(BytesMut::from(bytes));
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Writes everything out. The outbox is empty afterwards even on error.
    pub async fn flush_to<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> std::io::Result<()> {
        let mut result = self.write_all(writer).await;
        if result.is_ok() {
            // TLS keeps the last record until flushed; plain TCP has
            // nothing to flush.
            result = writer.flush().await;
        }
        self.chunks.clear();
        self.len = 0;
        result
    }

    async fn write_all<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> std::io::Result<()> {
        let mut first = 0;
        while first < self.chunks.len() {
            if self.chunks.len() - first == 1 {
                writer.write_all(&self.chunks[first]).await?;
                break;
            }
            let slices: Vec<IoSlice<'_>> = self.chunks[first..]
                .iter()
                .take(64)
                .map(|c| IoSlice::new(&c[..]))
                .collect();
            let mut written = writer.write_vectored(&slices).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let chunk = &mut self.chunks[first];
                if written >= chunk.len() {
                    written -= chunk.len();
                    first += 1;
                } else {
                    chunk.advance(written);
                    written = 0;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_contiguous_frames() {
        let mut buf = BytesMut::from(&b"aaaabbbbcccc"[..]);
        let a = buf.split_to(4);
        let b = buf.split_to(4);
        let mut out = Outbox::default();
        out.push(a);
        out.push(b);
        out.push_slice(b"zz");
        out.push(buf);
        assert_eq!(out.chunks.len(), 3);
        assert_eq!(out.len(), 14);
    }

    #[tokio::test]
    async fn writes_every_chunk_in_order() {
        let mut out = Outbox::default();
        for i in 0..200u8 {
            out.push_slice(&[i]);
        }
        let mut sink = Vec::new();
        out.flush_to(&mut sink).await.unwrap();
        assert_eq!(sink, (0..200u8).collect::<Vec<_>>());
        assert!(out.is_empty());
    }
}
