//! The session's side of the cache: answering cacheable reads locally,
//! capturing results on their way back from Postgres, and moving table
//! generations when writes commit.
//!
//! Ordering is what keeps results fresh. A fill snapshots generations
//! before its query goes upstream and is stored only if they are unchanged
//! when the answer is complete. A write's tables are bumped when its
//! transaction ends (the ReadyForQuery that reports idle), before that
//! ReadyForQuery reaches the client: any read that starts after the client
//! learns of the commit sees the new generations.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::Session;
use crate::admin::metrics::{self, Tier};
use crate::cache::catalog::Catalog;
use crate::cache::flight::Leader;
use crate::cache::generations::Snapshot;
use crate::cache::shared::StoredResult;
use crate::cache::{key, policy, Cache, Outcome};
use crate::protocol::messages as msg;
use crate::sql::analyze::{Analysis, Class, Name, Reason};

/// A result being captured for the cache.
#[derive(Debug)]
pub struct Fill {
    pub key: u128,
    pub snapshot: Snapshot,
    pub ttl: std::time::Duration,
    pub payload: BytesMut,
    pub row_description: Option<Bytes>,
    /// Present when this fill leads its key's single flight.
    pub leader: Option<Leader>,
    /// The statement shape, for per-shape upstream time.
    pub shape: Option<u128>,
    pub started: std::time::Instant,
}

/// What a statement's execution may have changed.
#[derive(Debug, Default, Clone)]
pub struct WriteSet {
    pub tables: Vec<Name>,
    /// Effects unknown: everything cached for the database goes.
    pub everything: bool,
    /// DDL: the catalog is reloaded too.
    pub schema: bool,
}

impl WriteSet {
    pub fn of(analysis: &Analysis) -> Option<Box<WriteSet>> {
        let set = match analysis.class {
            Class::Write => WriteSet {
                tables: analysis.writes.clone(),
                everything: analysis.writes.is_empty(),
                schema: false,
            },
            Class::Ddl => WriteSet {
                tables: Vec::new(),
                everything: true,
                schema: true,
            },
            Class::Unknown => WriteSet {
                tables: Vec::new(),
                everything: true,
                schema: false,
            },
            _ => return None,
        };
        Some(Box::new(set))
    }

    pub fn merge(&mut self, other: WriteSet) {
        self.tables.extend(other.tables);
        self.everything |= other.everything;
        self.schema |= other.schema;
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && !self.everything && !self.schema
    }
}

/// The session's view of its cache key inputs, recomputed when its
/// settings or the catalog change.
pub struct CacheContext {
    pub catalog: Arc<Catalog>,
    pub settings_version: u64,
    pub context: u128,
    pub schemas: Vec<String>,
}

#[derive(Default)]
pub struct CacheSession {
    pub context: Option<CacheContext>,
    /// Writes of the transaction in progress, bumped when it commits.
    pub tx_writes: WriteSet,
    /// The last command completed was a ROLLBACK: its transaction's writes
    /// never happened.
    pub last_rollback: bool,
    /// Set when the session holds state the key cannot describe.
    pub unsafe_reason: Option<Reason>,
}

impl Session {
    fn cache(&self) -> Option<Arc<Cache>> {
        self.proxy.cache.clone()
    }

    fn effective_role(&self) -> &str {
        match self.settings.current.get("role") {
            Some(role) if role != "none" => role,
            _ => &self.pool.target.user,
        }
    }

    /// Loads (through the session's server) or reuses the catalog, and
    /// brings the key context up to date.
    pub(super) async fn cache_context(&mut self) -> Result<(), Reason> {
        let Some(cache) = self.cache() else {
            return Err(Reason::Disabled);
        };
        let catalog = match cache.catalog(&self.pool.catalog_key) {
            Some(catalog) => catalog,
            None => {
                // The catalog is read over an idle server: one taken from
                // the pool now (which loads it), or the client's own when
                // nothing is in flight and no transaction is open.
                if self.server.is_some() && !self.is_between_transactions() {
                    return Err(Reason::CatalogUnavailable);
                }
                if self.server.is_none() && self.ensure_attached().await.is_err() {
                    return Err(Reason::CatalogUnavailable);
                }
                self.load_catalog()
                    .await
                    .ok_or(Reason::CatalogUnavailable)?
            }
        };
        let current = self.cache_state.context.as_ref().is_some_and(|c| {
            c.settings_version == self.settings.version && Arc::ptr_eq(&c.catalog, &catalog)
        });
        if !current {
            let search_path = self
                .settings
                .current
                .get("search_path")
                .cloned()
                .unwrap_or_else(|| catalog.default_search_path.clone());
            let schemas = catalog.search_schemas(&search_path, self.effective_role());
            let context = key::session_context(
                catalog.database_oid,
                &self.pool.target.user,
                &search_path,
                &self.settings.current,
            );
            self.cache_state.context = Some(CacheContext {
                catalog,
                settings_version: self.settings.version,
                context,
                schemas,
            });
        }
        Ok(())
    }

    /// Loads the catalog over the attached server, which must be idle.
    pub(super) async fn load_catalog(&mut self) -> Option<Arc<Catalog>> {
        let cache = self.cache()?;
        if let Some(catalog) = cache.catalog(&self.pool.catalog_key) {
            return Some(catalog);
        }
        let server = self.server.as_mut()?;
        match Box::pin(Catalog::load(server)).await {
            Ok(catalog) => Some(cache.store_catalog(&self.pool.catalog_key, catalog)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the catalog; caching is off until it loads");
                server.broken = true;
                None
            }
        }
    }

    /// Whether the session may use the cache for a statement now: outside
    /// any transaction, with nothing in flight.
    pub(super) fn cache_usable(&self) -> Result<(), Reason> {
        if self.cache().is_none() {
            return Err(Reason::Disabled);
        }
        if let Some(reason) = self.cache_state.unsafe_reason {
            return Err(reason);
        }
        if self.tx_status != b'I' || !self.pending.is_empty() {
            return Err(Reason::InTransaction);
        }
        Ok(())
    }

    /// Simple protocol: answers a cacheable read from the cache, or returns
    /// the fill to capture its result with. `Err` is the bypass reason.
    pub(super) async fn simple_query_lookup(
        &mut self,
        text: &str,
        shape: u128,
        analysis: &Analysis,
    ) -> Result<Option<Box<Fill>>, Reason> {
        let mut result = self.simple_query_decision(text, analysis).await;
        if let Some(cache) = self.cache() {
            let outcome = match &result {
                Ok(None) => Outcome::Hit,
                Ok(Some(_)) => Outcome::Miss,
                Err(reason) => Outcome::Bypass(*reason),
            };
            cache.stats.count(outcome);
            cache.shapes.record(shape, text, outcome);
            if let Ok(Some(fill)) = &mut result {
                fill.shape = Some(shape);
            }
        }
        result
    }

    async fn simple_query_decision(
        &mut self,
        text: &str,
        analysis: &Analysis,
    ) -> Result<Option<Box<Fill>>, Reason> {
        self.cache_usable()?;
        if let Some(reason) = analysis.not_cacheable {
            return Err(reason);
        }
        self.cache_context().await?;
        let Some(cache) = self.cache() else {
            return Err(Reason::Disabled);
        };
        let Some(ctx) = self.cache_state.context.as_ref() else {
            return Err(Reason::CatalogUnavailable);
        };
        let decision = policy::decide(
            analysis,
            &ctx.catalog,
            &ctx.schemas,
            &self.database,
            &cache.config.load(),
        )?;
        let key = key::statement_key(
            ctx.context,
            key::Protocol::Simple,
            text.as_bytes(),
            &[],
            b"",
        );
        let database = ctx.catalog.database_oid;
        let tables = decision.tables.clone();
        let snapshot = cache.snapshot(database, &tables).await?;
        if self.serve_hit(&cache, key, &snapshot, &decision).await {
            return Ok(None);
        }
        let leader = cache
            .flights
            .lead_or_wait(key, cache.config.load().single_flight_timeout)
            .await;
        if leader.is_none() && self.serve_hit(&cache, key, &snapshot, &decision).await {
            return Ok(None);
        }
        Ok(Some(Box::new(Fill {
            key,
            snapshot,
            ttl: decision.ttl,
            payload: BytesMut::new(),
            row_description: None,
            leader,
            shape: None,
            started: std::time::Instant::now(),
        })))
    }

    /// Writes a stored result and ReadyForQuery if the local tier (when it
    /// can be trusted) or Redis holds a current entry for `key`. Served
    /// only with nothing in flight, so nothing is owed before it.
    async fn serve_hit(
        &mut self,
        cache: &Arc<Cache>,
        key: u128,
        snapshot: &Snapshot,
        decision: &policy::Decision,
    ) -> bool {
        if cache.local_trusted() {
            if let Some(entry) = cache.local.get(key) {
                if entry.snapshot == *snapshot
                    && cache.generations.is_current(&entry.snapshot)
                    && cache.local_entry_usable(&entry)
                {
                    self.out.push_shared(entry.payload.clone());
                    self.push_local_ready();
                    metrics::tier_hit(Tier::Local);
                    cache.local_hit(key, &entry);
                    return true;
                }
                cache.local.remove(key);
            }
        }
        let Some(shared) = &cache.shared else {
            return false;
        };
        let Ok(Some((stored, age))) = shared.get(key, snapshot).await else {
            return false;
        };
        // The TTL is this query's (its rules may be shorter than the
        // filler's): an older result is not served, and a promoted copy
        // lives only for what is left of it.
        let Some(left) = decision.ttl.checked_sub(age).filter(|d| !d.is_zero()) else {
            return false;
        };
        self.out.push_shared(stored.payload.clone());
        self.push_local_ready();
        metrics::tier_hit(Tier::Redis);
        cache.promote(key, snapshot.clone(), stored, left);
        true
    }

    pub(super) fn max_entry_size(&self) -> usize {
        self.proxy
            .cache
            .as_ref()
            .map_or(0, |c| c.config.load().max_entry_size)
    }

    /// Stores a completed fill if nothing it read was written meanwhile.
    pub(super) fn complete_fill(&self, fill: Fill) {
        let Some(cache) = self.cache() else { return };
        let Fill {
            key,
            snapshot,
            ttl,
            payload,
            row_description,
            leader,
            shape,
            started,
        } = fill;
        if let Some(shape) = shape {
            cache.shapes.record_upstream(shape, started.elapsed());
        }
        let stored = StoredResult {
            payload: payload.freeze(),
            row_description,
        };
        // Followers look again only once the entry is in place.
        cache.store_fill(key, snapshot, stored, ttl, leader);
    }

    /// Called for each ReadyForQuery before it is forwarded: a transaction
    /// that ended idle and did not roll back publishes its writes.
    pub(super) async fn on_transaction_boundary(&mut self, status: u8) {
        if status != b'I' {
            return;
        }
        let writes = std::mem::take(&mut self.cache_state.tx_writes);
        let rolled_back = std::mem::take(&mut self.cache_state.last_rollback);
        if writes.is_empty() || rolled_back {
            return;
        }
        let Some(cache) = self.cache() else { return };
        let catalog = cache
            .catalog(&self.pool.catalog_key)
            .or_else(|| self.cache_state.context.as_ref().map(|c| c.catalog.clone()));
        let Some(catalog) = catalog else {
            // No catalog was ever loaded for this database, so nothing of it
            // is cached here; other pgstash instances cannot be told which
            // database this is either.
            return;
        };
        let database = catalog.database_oid;
        if writes.schema {
            cache.stats.invalidation(true);
            cache.schema_changed(&self.pool.catalog_key, database).await;
            // Statements prepared before the change keep failing the way
            // Postgres makes them fail ("cached plan must not change result
            // type", which drivers such as asyncpg handle); a statement
            // prepared again from now on is prepared afresh on the server.
            for pool in self.proxy.pools.all() {
                if pool.target.database == self.pool.target.database {
                    pool.forget_statements();
                }
            }
            return;
        }
        let schemas = match self.cache_state.context.as_ref() {
            Some(ctx) => ctx.schemas.clone(),
            None => catalog.search_schemas(&catalog.default_search_path, self.effective_role()),
        };
        let mut bumped = Vec::new();
        let mut everything = writes.everything;
        for name in &writes.tables {
            match catalog
                .resolve(name, &schemas)
                .and_then(|oid| catalog.write_closure(oid))
            {
                Some(tables) => bumped.extend(tables),
                // Unknown table (the catalog is behind) or user triggers: the
                // effects cannot be bounded.
                None => everything = true,
            }
        }
        bumped.sort_unstable();
        bumped.dedup();
        cache.stats.invalidation(everything);
        cache.publish(database, &bumped, everything).await;
    }

    /// Notes the writes of a statement whose execution just completed.
    pub(super) fn record_writes(&mut self, writes: Option<Box<WriteSet>>) {
        if let Some(writes) = writes {
            self.cache_state.tx_writes.merge(*writes);
        }
    }

    /// Makes sure the catalog is there before a write is sent, so its
    /// tables can be resolved when it commits.
    pub(super) async fn prepare_for_write(&mut self, writes: &Option<Box<WriteSet>>) {
        if writes.is_some() && self.cache().is_some() {
            let _ = self.cache_context().await;
        }
    }
}

/// Captures one frame of a result being filled; `false` abandons the fill
/// (an error, a notice, a COPY, or a result too large).
pub fn capture(fill: &mut Fill, tag: u8, raw: &[u8], max: usize) -> bool {
    match tag {
        msg::ROW_DESCRIPTION | msg::DATA_ROW | msg::COMMAND_COMPLETE => {
            if fill.payload.len() + raw.len() > max {
                return false;
            }
            fill.payload.extend_from_slice(raw);
            true
        }
        _ => false,
    }
}

/// Whether a CommandComplete body reports a ROLLBACK.
pub fn is_rollback_tag(body: &[u8]) -> bool {
    body.starts_with(b"ROLLBACK\0")
}
