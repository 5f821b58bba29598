//! Client → server: each frontend message is forwarded as it came, or
//! rewritten to the shared statement name, or answered by pgstash.

use std::sync::Arc;

use bytes::BytesMut;
use xxhash_rust::xxh3::Xxh3;

use super::caching::WriteSet;
use super::{Expect, Flow, Session, SessionError, Statement};
use crate::config::PoolMode;
use crate::protocol::frame::{split_frame, Frame};
use crate::protocol::messages::{self as msg, Bind, Parse, Target};
use crate::sql::analyze::{Analysis, Class, Reason};
use crate::sql::session_effects;
use crate::sql::SessionEffects;

impl Session {
    /// Handles every complete frame the client has sent, then writes what
    /// is due to the server and to the client.
    pub(super) async fn on_client_input(&mut self) -> Result<Flow, SessionError> {
        let max = self.proxy.config().max_message_size;
        let mut flow = Flow::Continue;
        loop {
            let batch_start = self.pending.is_empty()
                && self.tx_status == b'I'
                && self.proxy.cache.is_some()
                && matches!(self.client_buf.first(), Some(&msg::PARSE | &msg::BIND));
            if batch_start && self.answer_batch_locally().await? {
                continue;
            }
            let frame = match split_frame(&mut self.client_buf, max) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Err(SessionError::Protocol(e.to_string())),
            };
            if self.on_client_frame(frame).await? == Flow::Stop {
                flow = Flow::Stop;
                break;
            }
        }
        self.flush_server().await?;
        if !self.out.is_empty() {
            self.out.flush_to(&mut self.client).await?;
        }
        if self.server.is_some() && self.pending.is_empty() {
            // Attached only to load the catalog, then answered locally.
            if let Err(e) = self.on_batch_end().await {
                match e {
                    SessionError::Upstream(u) => self.on_server_lost(u).await?,
                    other => return Err(other),
                }
            }
        }
        Ok(flow)
    }

    async fn flush_server(&mut self) -> Result<(), SessionError> {
        if self.server_out.is_empty() {
            return Ok(());
        }
        let data = self.server_out.split();
        self.pool
            .stats
            .bytes_received
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if self.upstream_since.is_none() {
            self.upstream_since = Some(std::time::Instant::now());
        }
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        if let Err(e) = server.write_while_reading(&data).await {
            self.on_server_lost(e).await?;
        }
        Ok(())
    }

    async fn on_client_frame(&mut self, frame: Frame) -> Result<Flow, SessionError> {
        if !msg::is_frontend_tag(frame.tag) {
            return Err(SessionError::Protocol(format!(
                "invalid frontend message type {}",
                frame.tag
            )));
        }
        if frame.tag == msg::TERMINATE {
            return Ok(Flow::Stop);
        }
        if self.pending.is_empty() && self.tx_status == b'I' {
            self.batch_clean = true;
        }
        if matches!(frame.tag, msg::QUERY | msg::SYNC | msg::FUNCTION_CALL) {
            self.batch_clean = false;
        }
        if self.discard_until_sync {
            if frame.tag == msg::SYNC {
                self.discard_until_sync = false;
                self.on_sync(frame).await;
            }
            return Ok(Flow::Continue);
        }
        let tag = frame.tag;
        self.dispatch(frame).await?;
        // A server that saw extended-protocol messages since its last Sync
        // is inside an implicit transaction (or skipping to Sync after an
        // error) and cannot be handed to anyone else yet.
        if self.server.is_some() {
            match tag {
                msg::SYNC | msg::QUERY | msg::FUNCTION_CALL => self.unsynced = false,
                _ => self.unsynced = true,
            }
        }
        Ok(Flow::Continue)
    }

    async fn dispatch(&mut self, frame: Frame) -> Result<(), SessionError> {
        match frame.tag {
            msg::QUERY => self.on_query(frame).await?,
            msg::PARSE => self.on_parse(frame).await?,
            msg::BIND => self.on_bind(frame).await?,
            msg::DESCRIBE => self.on_describe(frame).await?,
            msg::CLOSE => self.on_close(frame).await?,
            msg::SYNC => self.on_sync(frame).await,
            msg::EXECUTE => self.on_execute(frame).await,
            msg::FUNCTION_CALL => self.forward(frame, Some(Expect::FunctionCall), false).await,
            msg::FLUSH => {
                if self.server.is_some() {
                    self.server_out.extend_from_slice(&frame.raw);
                }
            }
            msg::COPY_DONE | msg::COPY_FAIL => {
                if self.server.is_some() {
                    self.server_out.unsplit(frame.raw);
                    if self.copy_in {
                        self.copy_in = false;
                    } else {
                        self.pending.push_back(Expect::CopyEnd);
                    }
                }
            }
            // COPY data outside a COPY is ignored by Postgres as well.
            _ => {
                if self.server.is_some() {
                    self.server_out.extend_from_slice(&frame.raw);
                }
            }
        }
        Ok(())
    }

    /// Forwards a frame unchanged, attaching a server first.
    async fn forward(&mut self, frame: Frame, expect: Option<Expect>, extended: bool) {
        if !self.attach_or_fail(extended).await {
            return;
        }
        self.server_out.unsplit(frame.raw);
        if let Some(e) = expect {
            self.pending.push_back(e);
        }
    }

    /// Attaches a server; on failure answers with the error (and, for a
    /// simple query, ReadyForQuery) and returns false.
    async fn attach_or_fail(&mut self, extended: bool) -> bool {
        match self.ensure_attached().await {
            Ok(()) => true,
            Err((code, message)) => {
                self.push_error(&code, &message);
                if extended {
                    self.discard_until_sync = true;
                } else {
                    self.push_local_ready();
                }
                false
            }
        }
    }

    fn apply_effects(&mut self, effects: &SessionEffects) {
        if effects.is_empty() {
            return;
        }
        if effects.pin == Some("temporary table") {
            // A temporary table can shadow any unqualified name.
            self.cache_state.unsafe_reason = Some(Reason::TemporaryTable);
        }
        if effects.set.iter().any(|s| s == "session_authorization") {
            self.cache_state.unsafe_reason = Some(Reason::SessionState);
        }
        self.settings.dirty.extend(effects.set.iter().cloned());
        self.after_batch.reset.extend(effects.reset.iter().cloned());
        self.after_batch.reset_all |= effects.reset_all;
        self.after_batch.discard_all |= effects.discard_all;
        if let Some(reason) = effects.pin {
            if self.mode == PoolMode::Transaction && self.pinned.is_none() {
                tracing::debug!(reason, "client pinned to its server connection");
                self.pinned = Some(reason);
            }
        }
    }

    async fn on_query(&mut self, frame: Frame) -> Result<(), SessionError> {
        let text = msg::query_text(frame.body());
        if let Some(text) = text {
            self.note_statement(text.as_bytes());
        }
        let effects = text.map(session_effects).unwrap_or_default();
        if let Some(target) = &effects.deallocate {
            if self.deallocate_locally(target.as_deref()) {
                return Ok(());
            }
        }
        self.apply_effects(&effects);
        let mut fill = None;
        let mut writes = None;
        if let (Some(cache), Some(text)) = (self.proxy.cache.clone(), text) {
            let (shape, analysis) = cache.analyze_shaped(text);
            self.note_unknown_effects(&analysis);
            writes = WriteSet::of(&analysis);
            if writes.is_some() {
                self.prepare_for_write(&writes).await;
            } else {
                let started = std::time::Instant::now();
                match self.simple_query_lookup(text, shape, &analysis).await {
                    Ok(None) => {
                        crate::admin::metrics::get()
                            .hit_duration
                            .record(started.elapsed());
                        return Ok(());
                    }
                    Ok(Some(f)) => fill = Some(f),
                    Err(reason) => tracing::trace!(outcome = reason.as_str(), "cache bypass"),
                }
            }
        }
        // A simple query replaces the server's unnamed statement.
        self.unnamed_on_server = false;
        self.forward(frame, Some(Expect::Query { fill, writes }), false)
            .await;
        Ok(())
    }

    /// Statements whose effects are unknown may have changed the role or
    /// search_path inside; read those back before the next cache decision.
    fn note_unknown_effects(&mut self, analysis: &Analysis) {
        if analysis.class == Class::Unknown {
            self.settings.dirty.insert("role".into());
            self.settings.dirty.insert("search_path".into());
        }
    }

    fn analysis_of(&self, text: &[u8]) -> Option<Arc<Analysis>> {
        let cache = self.proxy.cache.as_ref()?;
        let analysis = cache.analyze(std::str::from_utf8(text).ok()?);
        Some(analysis)
    }

    async fn on_execute(&mut self, frame: Frame) {
        let mut fill = None;
        let writes = if self.proxy.cache.is_some() {
            let mut body = frame.body();
            let portal = crate::protocol::frame::get_cstr(&mut body).unwrap_or_default();
            let writes = match self.portal_analysis.get(portal) {
                Some(analysis) => {
                    if !analysis.is_cacheable_candidate() {
                        // Reads after this in the batch may see its effects
                        // before they commit.
                        self.batch_clean = false;
                    }
                    WriteSet::of(analysis)
                }
                // Unknown statement (SQL-level PREPARE, say): assume the worst.
                None => WriteSet::of(&Analysis::unknown()),
            };
            fill = self.fill_for_execute(frame.body()).await;
            writes
        } else {
            None
        };
        self.prepare_for_write(&writes).await;
        self.forward(frame, Some(Expect::Execute { writes, fill }), true)
            .await;
    }

    /// `DEALLOCATE name` of a protocol-level statement is pgstash's to
    /// answer: the server knows the statement under its shared name.
    fn deallocate_locally(&mut self, target: Option<&str>) -> bool {
        let tag = match target {
            Some(name) => {
                if self.statements.remove(name.as_bytes()).is_none() {
                    return false;
                }
                "DEALLOCATE"
            }
            None => {
                self.statements.clear();
                if self.pinned == Some("SQL PREPARE") {
                    // SQL-level statements live on the server: let it drop them.
                    self.after_batch.deallocate_all = true;
                    return false;
                }
                "DEALLOCATE ALL"
            }
        };
        let mut out = BytesMut::new();
        msg::command_complete(&mut out, tag);
        self.push_local(out);
        self.push_local_ready();
        true
    }

    async fn on_parse(&mut self, frame: Frame) -> Result<(), SessionError> {
        let Some(parse) = Parse::decode(frame.body()) else {
            return Err(SessionError::Protocol("malformed Parse message".into()));
        };
        let effects = std::str::from_utf8(parse.query)
            .map(session_effects)
            .unwrap_or_default();
        self.note_statement(parse.query);
        let analysis = self.analysis_of(parse.query);
        if let Some(analysis) = &analysis {
            self.note_unknown_effects(analysis);
        }
        if parse.name.is_empty() {
            self.unnamed_on_server = true;
            self.unnamed = Some(Arc::new(Statement {
                id: 0,
                server_name: Vec::new(),
                query: parse.query.to_vec(),
                param_types: parse.param_types.clone(),
                effects: effects.clone(),
                analysis,
            }));
            self.apply_effects(&effects);
            self.forward(
                frame,
                Some(Expect::Parse {
                    shown: true,
                    prepared: None,
                    client_name: None,
                }),
                true,
            )
            .await;
            return Ok(());
        }
        if self.statements.contains_key(parse.name) {
            let name = String::from_utf8_lossy(parse.name).into_owned();
            self.push_error(
                "42P05",
                &format!("prepared statement \"{name}\" already exists"),
            );
            self.discard_until_sync = true;
            return Ok(());
        }
        let id = statement_id(&parse, self.search_path());
        let statement = Arc::new(Statement {
            id,
            server_name: format!("pgstash_{id:032x}").into_bytes(),
            query: parse.query.to_vec(),
            param_types: parse.param_types.clone(),
            effects,
            analysis,
        });
        self.apply_effects(&statement.effects);
        if self.server.is_none() && self.pending.is_empty() && self.pool.is_known_statement(id) {
            // Postgres has accepted this exact statement before: answer
            // without taking a server. It is prepared lazily wherever the
            // client's Bind lands. Clients that prepare with a blocking call
            // (pgbench) would otherwise wait for a server held by their own
            // thread's open transactions.
            self.statements.insert(parse.name.to_vec(), statement);
            let mut out = BytesMut::new();
            msg::empty_message(&mut out, msg::PARSE_COMPLETE);
            self.push_local(out);
            return Ok(());
        }
        if !self.attach_or_fail(true).await {
            return Ok(());
        }
        self.statements
            .insert(parse.name.to_vec(), statement.clone());
        let client_name = Some(parse.name.to_vec());
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let known = self.pool.is_known_statement(id);
        if server.prepared.contains(&id) && known {
            let mut out = BytesMut::new();
            msg::empty_message(&mut out, msg::PARSE_COMPLETE);
            self.push_local(out);
        } else {
            if server.prepared.contains(&id) {
                // Prepared here before a schema change: a client preparing
                // it now must get a plan of the schema as it is now.
                Target {
                    kind: b'S',
                    name: &statement.server_name,
                }
                .encode(msg::CLOSE, &statement.server_name, &mut self.server_out);
                self.pending.push_back(Expect::Close { shown: false });
            }
            server.prepared.insert(id);
            parse.encode_named(&statement.server_name, &mut self.server_out);
            self.pending.push_back(Expect::Parse {
                shown: true,
                prepared: Some(id),
                client_name,
            });
        }
        Ok(())
    }

    /// The unnamed statement lives on one server connection; a client that
    /// binds it after landing on another (or after pgstash answered its
    /// Parse from the cache) gets it prepared there first, silently.
    fn ensure_unnamed_on_server(&mut self) {
        if self.unnamed_on_server {
            return;
        }
        let Some(unnamed) = self.unnamed.clone() else {
            return;
        };
        let parse = Parse {
            name: b"",
            query: &unnamed.query,
            param_types: unnamed.param_types.clone(),
        };
        parse.encode_named(b"", &mut self.server_out);
        self.pending.push_back(Expect::Parse {
            shown: false,
            prepared: None,
            client_name: None,
        });
        self.unnamed_on_server = true;
    }

    /// Makes sure the attached server has `statement`, preparing it there
    /// (silently) if this client landed on a server that never saw it.
    fn ensure_prepared(&mut self, statement: &Statement) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if server.prepared.insert(statement.id) {
            let parse = Parse {
                name: &statement.server_name,
                query: &statement.query,
                param_types: statement.param_types.clone(),
            };
            parse.encode_named(&statement.server_name, &mut self.server_out);
            self.pending.push_back(Expect::Parse {
                shown: false,
                prepared: Some(statement.id),
                client_name: None,
            });
        }
    }

    async fn on_bind(&mut self, frame: Frame) -> Result<(), SessionError> {
        let Some(bind) = Bind::decode(frame.body()) else {
            return Err(SessionError::Protocol("malformed Bind message".into()));
        };
        let statement = self.statements.get(bind.statement).cloned();
        let source = match &statement {
            Some(s) => Some(s.clone()),
            None if bind.statement.is_empty() => self.unnamed.clone(),
            None => None,
        };
        match source.as_ref().and_then(|s| s.analysis.clone()) {
            Some(analysis) => {
                if let Some(s) = &source {
                    self.plan_portal_fill(
                        bind.portal,
                        &s.query,
                        &s.param_types,
                        bind.rest,
                        &analysis,
                    )
                    .await;
                }
                self.portal_analysis.insert(bind.portal.to_vec(), analysis);
            }
            None => {
                self.portal_analysis.remove(bind.portal);
                self.portal_fills.remove(bind.portal);
            }
        }
        let Some(statement) = statement else {
            if bind.statement.is_empty() {
                if !self.attach_or_fail(true).await {
                    return Ok(());
                }
                self.ensure_unnamed_on_server();
            }
            self.forward(frame, Some(Expect::Bind), true).await;
            return Ok(());
        };
        self.apply_effects(&statement.effects);
        if !self.attach_or_fail(true).await {
            return Ok(());
        }
        self.ensure_prepared(&statement);
        bind.encode_with_statement(&statement.server_name, &mut self.server_out);
        self.pending.push_back(Expect::Bind);
        Ok(())
    }

    async fn on_describe(&mut self, frame: Frame) -> Result<(), SessionError> {
        let Some(target) = Target::decode(frame.body()) else {
            return Err(SessionError::Protocol("malformed Describe message".into()));
        };
        let statement = match target.kind {
            b'S' => self.statements.get(target.name).cloned(),
            _ => None,
        };
        let Some(statement) = statement else {
            let capture = target.kind == b'P' && self.portal_fills.contains_key(target.name);
            self.forward(frame, Some(Expect::Describe { capture }), true)
                .await;
            return Ok(());
        };
        if !self.attach_or_fail(true).await {
            return Ok(());
        }
        self.ensure_prepared(&statement);
        target.encode(msg::DESCRIBE, &statement.server_name, &mut self.server_out);
        self.pending.push_back(Expect::Describe { capture: false });
        Ok(())
    }

    async fn on_close(&mut self, frame: Frame) -> Result<(), SessionError> {
        let Some(target) = Target::decode(frame.body()) else {
            return Err(SessionError::Protocol("malformed Close message".into()));
        };
        if target.kind == b'S' && self.statements.remove(target.name).is_some() {
            // Other clients may share the server-side statement; only the
            // client's name for it goes away.
            let mut out = BytesMut::new();
            msg::empty_message(&mut out, msg::CLOSE_COMPLETE);
            self.push_local(out);
            return Ok(());
        }
        self.forward(frame, Some(Expect::Close { shown: true }), true)
            .await;
        Ok(())
    }

    async fn on_sync(&mut self, frame: Frame) {
        if self.server.is_none() {
            // Nothing in flight and no server: the answer is known.
            self.push_local_ready();
            return;
        }
        self.server_out.unsplit(frame.raw);
        if !self.copy_in {
            self.pending.push_back(Expect::Sync);
        }
    }
}

/// The shared identity of a statement: same text and parameter types from
/// any client means the same server-side statement.
///
/// The search_path is part of it: Postgres resolves a statement's tables
/// when it is prepared, so one text prepared under two paths is two
/// statements.
pub(super) fn statement_id(parse: &Parse<'_>, search_path: &str) -> u128 {
    let mut hasher = Xxh3::new();
    hasher.update(&(search_path.len() as u64).to_be_bytes());
    hasher.update(search_path.as_bytes());
    hasher.update(parse.query);
    hasher.update(&[0]);
    for oid in &parse.param_types {
        hasher.update(&oid.to_be_bytes());
    }
    hasher.digest128()
}
