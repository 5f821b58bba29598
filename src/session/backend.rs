//! Server → client: frames pass through untouched except the answers to
//! messages pgstash injected, and the `pending` queue advances with them.

use bytes::BytesMut;

use super::{caching, Expect, Session, SessionError};
use crate::protocol::frame::Frame;
use crate::protocol::messages as msg;

impl Session {
    pub(super) async fn on_server_input(&mut self) -> Result<(), SessionError> {
        while let Some(server) = self.server.as_mut() {
            match server.next_buffered_frame() {
                Ok(Some(frame)) => self.on_server_frame(frame).await,
                Ok(None) => break,
                Err(e) => {
                    self.on_server_lost(e).await?;
                    break;
                }
            }
        }
        self.drain_local();
        if !self.out.is_empty() {
            // Counted once per read, not per frame: a result can be
            // thousands of DataRows.
            self.pool
                .stats
                .bytes_sent
                .fetch_add(self.out.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.out.flush_to(&mut self.client).await?;
        }
        if let Err(e) = self.on_batch_end().await {
            match e {
                SessionError::Upstream(u) => self.on_server_lost(u).await?,
                other => return Err(other),
            }
        }
        Ok(())
    }

    /// Emits the local answers that are now at the front of the queue.
    fn drain_local(&mut self) {
        while let Some(front) = self.pending.front() {
            match front {
                Expect::Local(_) => {
                    if let Some(Expect::Local(bytes)) = self.pending.pop_front() {
                        self.out.push(bytes);
                    }
                }
                Expect::CopyEnd => {
                    self.pending.pop_front();
                }
                Expect::LocalReady => {
                    self.pending.pop_front();
                    let mut out = BytesMut::new();
                    msg::ready_for_query(&mut out, self.tx_status);
                    self.out.push(out);
                }
                _ => break,
            }
        }
    }

    async fn on_server_frame(&mut self, frame: Frame) {
        self.drain_local();
        tracing::trace!(tag = %(frame.tag as char), pending = ?self.pending, "server frame");
        self.capture_for_front(&frame);
        match frame.tag {
            msg::PARSE_COMPLETE => {
                if let Some(Expect::Parse {
                    shown, prepared, ..
                }) = self.pending.front()
                {
                    let shown = *shown;
                    if let Some(id) = prepared {
                        self.pool.remember_statement(*id);
                    }
                    self.pending.pop_front();
                    if !shown {
                        return;
                    }
                }
            }
            msg::CLOSE_COMPLETE => {
                if let Some(Expect::Close { shown }) = self.pending.front() {
                    let shown = *shown;
                    self.pending.pop_front();
                    if !shown {
                        return;
                    }
                }
            }
            msg::BIND_COMPLETE | msg::NO_DATA => {
                if matches!(
                    self.pending.front(),
                    Some(Expect::Bind | Expect::Describe { .. })
                ) {
                    self.pending.pop_front();
                }
            }
            msg::ROW_DESCRIPTION => {
                if let Some(Expect::Describe { capture }) = self.pending.front() {
                    if *capture {
                        self.attach_row_description(&frame.raw);
                    }
                    self.pending.pop_front();
                }
            }
            msg::COMMAND_COMPLETE | msg::EMPTY_QUERY | msg::PORTAL_SUSPENDED => {
                if frame.tag == msg::COMMAND_COMPLETE {
                    self.cache_state.last_rollback = caching::is_rollback_tag(frame.body());
                }
                if matches!(self.pending.front(), Some(Expect::Execute { .. })) {
                    if let Some(Expect::Execute { writes, fill }) = self.pending.pop_front() {
                        self.record_writes(writes);
                        if let Some(fill) = fill {
                            self.complete_fill(*fill);
                        }
                    }
                }
            }
            msg::COPY_IN | msg::COPY_BOTH => self.on_copy_in_started(),
            msg::ERROR_RESPONSE => self.on_server_error(&frame),
            msg::READY_FOR_QUERY => {
                let status = msg::ready_status(&frame.raw);
                while let Some(expect) = self.pending.pop_front() {
                    if let Expect::Query { fill, writes } = expect {
                        self.record_writes(writes);
                        if let Some(fill) = fill {
                            if status == b'I' {
                                self.complete_fill(*fill);
                            }
                        }
                        break;
                    }
                    if expect.is_sync_point() {
                        break;
                    }
                    self.undo(expect);
                }
                self.tx_status = status;
                let stats = &self.pool.stats;
                stats
                    .queries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if status == b'I' {
                    stats
                        .xacts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if self.pending.is_empty() {
                    if let Some(since) = self.upstream_since.take() {
                        let elapsed = since.elapsed();
                        crate::admin::metrics::get()
                            .upstream_duration
                            .record(elapsed);
                        let threshold = self.proxy.config().slow_query_threshold;
                        if let Some(statement) = self.slow_candidate.take() {
                            if !threshold.is_zero() && elapsed >= threshold {
                                tracing::warn!(
                                    statement,
                                    duration_ms = elapsed.as_millis() as u64,
                                    "slow query"
                                );
                            }
                        }
                    }
                }
                // Before the client hears the transaction is over.
                self.on_transaction_boundary(status).await;
            }
            msg::PARAMETER_STATUS => {
                if let Some((name, value)) = msg::parameter_status_fields(frame.body()) {
                    self.settings.reported(&name, &value);
                    if let Some(server) = self.server.as_mut() {
                        let name = name.to_ascii_lowercase();
                        if super::settings::ClientSettings::is_tracked(&name) {
                            server.settings.insert(name, value);
                        }
                    }
                }
            }
            _ => {}
        }
        self.out.push(frame.raw);
    }

    /// Feeds a frame to the fill of the Query at the front, if any; a frame
    /// that cannot be replayed from the cache abandons the fill.
    fn capture_for_front(&mut self, frame: &Frame) {
        if frame.tag == msg::READY_FOR_QUERY {
            return;
        }
        let max = self.max_entry_size();
        if let Some(Expect::Query { fill, .. } | Expect::Execute { fill, .. }) =
            self.pending.front_mut()
        {
            if let Some(f) = fill.as_mut() {
                if !caching::capture(f, frame.tag, &frame.raw, max) {
                    *fill = None;
                }
            }
        }
    }

    /// Gives a Describe's RowDescription to the fill of the Execute that
    /// follows it in the batch.
    fn attach_row_description(&mut self, raw: &[u8]) {
        for expect in self.pending.iter_mut().skip(1) {
            match expect {
                Expect::Execute {
                    fill: Some(fill), ..
                } => {
                    fill.row_description = Some(bytes::Bytes::copy_from_slice(raw));
                    return;
                }
                Expect::Execute { .. } | Expect::Sync => return,
                _ => {}
            }
        }
    }

    /// Syncs the client sent after the statement that started this COPY
    /// and before its end will be ignored by Postgres: no ReadyForQuery is
    /// owed for them.
    fn on_copy_in_started(&mut self) {
        let mut i = 1;
        while i < self.pending.len() {
            match self.pending[i] {
                Expect::Sync => {
                    self.pending.remove(i);
                }
                Expect::CopyEnd => {
                    self.pending.remove(i);
                    return;
                }
                _ => i += 1,
            }
        }
        self.copy_in = true;
    }

    /// After an error Postgres skips every message up to Sync; so does the
    /// queue, undoing what those messages would have done.
    fn on_server_error(&mut self, frame: &Frame) {
        self.after_batch.error_seen = true;
        // An error ends a COPY FROM STDIN on the server's side.
        self.copy_in = false;
        let (code, message) = msg::error_fields(frame.body());
        tracing::debug!(code, message, "server error");
        if code == "0A000" && message.contains("cached plan") {
            // A shared statement outlived a schema change. The client sees
            // the error as Postgres sends it; this server drops its shared
            // statements once the batch is over, and nobody is told a
            // statement is known without Postgres accepting it again.
            self.after_batch.stale_statements = true;
            self.pool.forget_statements();
        }
        while let Some(front) = self.pending.front() {
            if front.is_sync_point() {
                break;
            }
            if let Some(expect) = self.pending.pop_front() {
                self.undo(expect);
            }
        }
    }

    /// A Parse that never completed leaves no statement behind.
    fn undo(&mut self, expect: Expect) {
        if let Expect::Execute { writes, .. } = expect {
            // It may have written before it failed; its transaction decides.
            self.record_writes(writes);
            return;
        }
        if let Expect::Parse {
            prepared: Some(id),
            client_name,
            ..
        } = expect
        {
            if let Some(server) = self.server.as_mut() {
                server.prepared.remove(&id);
            }
            if let Some(name) = client_name {
                if self.statements.get(&name).is_some_and(|s| s.id == id) {
                    self.statements.remove(&name);
                }
            }
        }
    }
}
