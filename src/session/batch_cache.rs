//! The extended protocol and the cache. A pipelined batch — any number of
//! `[Parse] Bind [Describe portal] Execute` groups and a Sync — is answered
//! by pgstash only if every Execute in it is a hit (in the local tier, or
//! in Redis); otherwise the whole batch goes upstream and the results of
//! its cacheable Executes are captured on the way back.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

use super::caching::Fill;
use super::{Session, SessionError, Statement};
use crate::admin::metrics::{self, Tier};
use crate::cache::key::{statement_key, Protocol};
use crate::cache::local::Entry;
use crate::cache::policy::{self, Decision};
use crate::cache::Cache;
use crate::protocol::frame::{get_cstr, get_i32, HEADER_LEN};
use crate::protocol::messages::{self as msg, Bind, Parse, Target};
use crate::sql::analyze::Analysis;
use crate::sql::session_effects;

/// One `[Parse] Bind [Describe] Execute` group of a batch.
struct Group<'a> {
    parse: Option<Parse<'a>>,
    bind: Bind<'a>,
    describe: bool,
}

/// One Execute of a batch that may be answered from the cache.
struct PlannedExecute {
    parsed: bool,
    describe: bool,
    key: u128,
    decision: Decision,
}

/// A batch that could be answered from the cache, and the statements
/// answering it would create.
struct AnswerPlan {
    executes: Vec<PlannedExecute>,
    new_statements: Vec<(Vec<u8>, Arc<Statement>)>,
    unnamed: Option<Arc<Statement>>,
}

type Answer = (
    Vec<Bytes>,
    Vec<(Vec<u8>, Arc<Statement>)>,
    Option<Arc<Statement>>,
);

/// The response to a planned batch if every Execute in it is a hit: in
/// the local tier when it can be trusted, else in Redis (promoted to the
/// local tier for what is left of the entry's life).
async fn fetch_answer(cache: &Arc<Cache>, database: u32, plan: AnswerPlan) -> Option<Answer> {
    let mut response = Vec::with_capacity(plan.executes.len() * 3);
    for execute in &plan.executes {
        let (payload, row_description) = match local_hit(cache, execute.key) {
            Some(entry) => {
                metrics::tier_hit(Tier::Local);
                cache.local_hit(execute.key, &entry);
                (entry.payload.clone(), entry.row_description.clone())
            }
            None => redis_hit(cache, database, execute).await?,
        };
        if execute.parsed {
            response.push(Bytes::from_static(b"1\0\0\0\x04"));
        }
        response.push(Bytes::from_static(b"2\0\0\0\x04"));
        if execute.describe {
            response.push(row_description?);
        }
        response.push(payload);
    }
    Some((response, plan.new_statements, plan.unnamed))
}

fn local_hit(cache: &Cache, key: u128) -> Option<Arc<Entry>> {
    if !cache.local_trusted() {
        return None;
    }
    let entry = cache.local.get(key)?;
    (cache.generations.is_current(&entry.snapshot) && cache.local_entry_usable(&entry))
        .then_some(entry)
}

async fn redis_hit(
    cache: &Cache,
    database: u32,
    execute: &PlannedExecute,
) -> Option<(Bytes, Option<Bytes>)> {
    let shared = cache.shared.as_ref()?;
    let snapshot = cache
        .snapshot(database, &execute.decision.tables)
        .await
        .ok()?;
    let (stored, age) = shared.get(execute.key, &snapshot).await.ok()??;
    // This query's TTL bounds the entry's age, as for simple queries.
    let left = execute
        .decision
        .ttl
        .checked_sub(age)
        .filter(|d| !d.is_zero())?;
    metrics::tier_hit(Tier::Redis);
    cache.promote(execute.key, snapshot, stored.clone(), left);
    Some((stored.payload, stored.row_description))
}

/// What a portal bound for a cacheable statement will be stored under.
#[derive(Debug, Clone)]
pub struct PortalFill {
    pub key: u128,
    pub decision: Decision,
}

impl Session {
    /// Answers the batch at the front of the client's buffer from the cache
    /// if it can; `false` leaves the buffer for ordinary processing.
    pub(super) async fn answer_batch_locally(&mut self) -> Result<bool, SessionError> {
        if self.discard_until_sync || self.cache_usable().is_err() {
            return Ok(false);
        }
        let Some(cache) = self.proxy.cache.clone() else {
            return Ok(false);
        };
        if !cache.local_trusted() && cache.shared.is_none() {
            return Ok(false);
        }
        let Some(batch_len) = batch_length(&self.client_buf) else {
            return Ok(false);
        };
        let started = std::time::Instant::now();
        if self.cache_context().await.is_err() {
            return Ok(false);
        }
        let Some(database) = self
            .cache_state
            .context
            .as_ref()
            .map(|ctx| ctx.catalog.database_oid)
        else {
            return Ok(false);
        };
        let answer = match self.plan_answer(&self.client_buf[..batch_len]) {
            Some(plan) => fetch_answer(&cache, database, plan).await,
            None => None,
        };
        let Some((response, new_statements, unnamed)) = answer else {
            return Ok(false);
        };
        self.client_buf.advance(batch_len);
        cache.stats.count(crate::cache::Outcome::Hit);
        for (name, statement) in new_statements {
            self.statements.insert(name, statement);
        }
        if let Some(statement) = unnamed {
            self.unnamed = Some(statement);
        }
        for chunk in response {
            self.out.push_shared(chunk);
        }
        self.push_local_ready();
        crate::admin::metrics::get()
            .hit_duration
            .record(started.elapsed());
        Ok(true)
    }

    /// What answering `batch` from the cache would take: every group's
    /// key and tables, or `None` if some Execute is not cacheable.
    fn plan_answer(&self, batch: &[u8]) -> Option<AnswerPlan> {
        let cache = self.proxy.cache.as_ref()?;
        let ctx = self.cache_state.context.as_ref()?;
        let groups = parse_groups(batch)?;
        let mut plan = AnswerPlan {
            executes: Vec::with_capacity(groups.len()),
            new_statements: Vec::new(),
            unnamed: None,
        };
        for group in &groups {
            // Borrowed: copying the text and parameter types of every
            // execute cost two allocations a query.
            let (text, types, analysis): (&[u8], &[u32], _) = match &group.parse {
                Some(parse) => {
                    let analysis = cache.analyze(std::str::from_utf8(parse.query).ok()?);
                    if parse.name.is_empty() {
                        plan.unnamed = Some(Arc::new(new_statement(
                            parse,
                            analysis.clone(),
                            self.search_path(),
                        )));
                    } else {
                        if self.statements.contains_key(parse.name)
                            || plan.new_statements.iter().any(|(n, _)| n == parse.name)
                        {
                            return None;
                        }
                        plan.new_statements.push((
                            parse.name.to_vec(),
                            Arc::new(new_statement(parse, analysis.clone(), self.search_path())),
                        ));
                    }
                    (parse.query, &parse.param_types, analysis)
                }
                None if group.bind.statement.is_empty() => {
                    let statement = plan.unnamed.as_ref()?;
                    (
                        &statement.query,
                        &statement.param_types,
                        statement.analysis.clone()?,
                    )
                }
                None => {
                    let statement = self.statements.get(group.bind.statement).or_else(|| {
                        plan.new_statements
                            .iter()
                            .find(|(n, _)| n == group.bind.statement)
                            .map(|(_, s)| s)
                    })?;
                    (
                        &statement.query,
                        &statement.param_types,
                        statement.analysis.clone()?,
                    )
                }
            };
            let decision = policy::decide(
                &analysis,
                &ctx.catalog,
                &ctx.schemas,
                &self.database,
                &cache.config.load(),
            )
            .ok()?;
            let key = statement_key(
                ctx.context,
                Protocol::Extended,
                text,
                types,
                group.bind.rest,
            );
            plan.executes.push(PlannedExecute {
                parsed: group.parse.is_some(),
                describe: group.describe,
                key,
                decision,
            });
        }
        Some(plan)
    }

    /// On Bind: remembers the key a cacheable portal's result would be
    /// stored under, when the batch so far allows caching.
    pub(super) async fn plan_portal_fill(
        &mut self,
        portal: &[u8],
        text: &[u8],
        types: &[u32],
        bind_rest: &[u8],
        analysis: &Analysis,
    ) {
        self.portal_fills.remove(portal);
        if !self.batch_clean
            || !analysis.is_cacheable_candidate()
            || self.cache_state.unsafe_reason.is_some()
        {
            return;
        }
        if self.cache_context().await.is_err() {
            return;
        }
        let (Some(cache), Some(ctx)) =
            (self.proxy.cache.as_ref(), self.cache_state.context.as_ref())
        else {
            return;
        };
        let Ok(decision) = policy::decide(
            analysis,
            &ctx.catalog,
            &ctx.schemas,
            &self.database,
            &cache.config.load(),
        ) else {
            return;
        };
        let key = statement_key(ctx.context, Protocol::Extended, text, types, bind_rest);
        self.portal_fills
            .insert(portal.to_vec(), PortalFill { key, decision });
    }

    /// On Execute: the fill for this portal, if its result may be stored.
    pub(super) async fn fill_for_execute(&mut self, body: &[u8]) -> Option<Box<Fill>> {
        let mut rest = body;
        let portal = get_cstr(&mut rest)?;
        let max_rows = get_i32(&mut rest)?;
        let planned = self.portal_fills.remove(portal)?;
        if max_rows != 0 || !self.batch_clean {
            return None;
        }
        let cache = self.proxy.cache.clone()?;
        let database = self.cache_state.context.as_ref()?.catalog.database_oid;
        cache.stats.count(crate::cache::Outcome::Miss);
        let snapshot = cache
            .snapshot(database, &planned.decision.tables)
            .await
            .ok()?;
        Some(Box::new(Fill {
            key: planned.key,
            snapshot,
            ttl: planned.decision.ttl,
            payload: BytesMut::new(),
            row_description: None,
            leader: None,
            shape: None,
            started: std::time::Instant::now(),
        }))
    }
}

fn new_statement(parse: &Parse<'_>, analysis: Arc<Analysis>, search_path: &str) -> Statement {
    let id = super::frontend::statement_id(parse, search_path);
    Statement {
        id,
        server_name: format!("pgstash_{id:032x}").into_bytes(),
        query: parse.query.to_vec(),
        param_types: parse.param_types.clone(),
        effects: std::str::from_utf8(parse.query)
            .map(session_effects)
            .unwrap_or_default(),
        analysis: Some(analysis),
    }
}

/// The length of the batch at the front of `buf` (through its Sync) if it
/// is complete and made only of Parse, Bind, Describe, Execute and Sync.
fn batch_length(buf: &[u8]) -> Option<usize> {
    let mut offset = 0;
    loop {
        let header = buf.get(offset..offset + HEADER_LEN)?;
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if len < 4 {
            return None;
        }
        let end = offset + 1 + len as usize;
        if end > buf.len() {
            return None;
        }
        match header[0] {
            msg::PARSE | msg::BIND | msg::DESCRIBE | msg::EXECUTE => offset = end,
            msg::SYNC => return Some(end),
            _ => return None,
        }
    }
}

/// Splits a batch into groups; `None` if it has any other shape.
fn parse_groups(batch: &[u8]) -> Option<Vec<Group<'_>>> {
    let mut groups = Vec::new();
    let mut parse: Option<Parse<'_>> = None;
    let mut bind: Option<Bind<'_>> = None;
    let mut describe = false;
    let mut offset = 0;
    while offset < batch.len() {
        let tag = batch[offset];
        let len = i32::from_be_bytes(batch.get(offset + 1..offset + 5)?.try_into().ok()?) as usize;
        let body = batch.get(offset + HEADER_LEN..offset + 1 + len)?;
        offset += 1 + len;
        match tag {
            msg::PARSE if parse.is_none() && bind.is_none() => parse = Some(Parse::decode(body)?),
            msg::BIND if bind.is_none() => bind = Some(Bind::decode(body)?),
            msg::DESCRIBE => {
                let target = Target::decode(body)?;
                let b = bind.as_ref()?;
                if target.kind != b'P' || target.name != b.portal || describe {
                    return None;
                }
                describe = true;
            }
            msg::EXECUTE => {
                let b = bind.take()?;
                let mut rest = body;
                let portal = get_cstr(&mut rest)?;
                let max_rows = get_i32(&mut rest)?;
                if portal != b.portal || max_rows != 0 {
                    return None;
                }
                groups.push(Group {
                    parse: parse.take(),
                    bind: b,
                    describe: std::mem::take(&mut describe),
                });
            }
            msg::SYNC if parse.is_none() && bind.is_none() => {}
            _ => return None,
        }
    }
    (!groups.is_empty()).then_some(groups)
}
