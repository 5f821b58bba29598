//! The admin console: connecting to the virtual database `pgstash` gives
//! PgBouncer-style SHOW commands (with PgBouncer's column names where the
//! concept is the same) and control commands, as ordinary result sets over
//! the simple query protocol.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::tls::ClientStream;
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;
use crate::listener::Proxy;
use crate::protocol::frame::split_frame;
use crate::protocol::messages::{self as msg, Severity};

pub const ADMIN_DATABASE: &str = "pgstash";

const COMMANDS: &str = "SHOW POOLS | CLIENTS | SERVERS | STATS | CONFIG | CACHE | CACHED QUERIES | HELP, \
RELOAD, PAUSE [db], RESUME [db], RECONNECT [db], CACHE FLUSH [db], CACHE INVALIDATE db.table, SHUTDOWN";

/// A result set: column names, then rows of text (None is NULL).
struct Table {
    columns: Vec<&'static str>,
    rows: Vec<Vec<Option<String>>>,
}

enum Reply {
    Rows(Table),
    Done(String),
}

/// Serves an admin connection after its StartupMessage.
pub async fn serve(
    mut stream: ClientStream,
    mut buf: BytesMut,
    params: &BTreeMap<String, String>,
    proxy: Arc<Proxy>,
) {
    let config = proxy.config();
    let user = params.get("user").cloned().unwrap_or_default();
    let local = stream
        .tcp()
        .peer_addr()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(false);
    let mut out = BytesMut::new();
    if !config.admin.allow_remote && !local {
        msg::error_response(
            &mut out,
            Severity::Fatal,
            "28000",
            "the admin console accepts local connections only",
        );
        let _ = send(&mut stream, &out).await;
        return;
    }
    if !config.admin.users.is_empty() && !config.admin.users.contains(&user) {
        msg::error_response(
            &mut out,
            Severity::Fatal,
            "28000",
            &format!("user \"{user}\" is not an admin user"),
        );
        let _ = send(&mut stream, &out).await;
        return;
    }
    msg::authentication_ok(&mut out);
    for (name, value) in [
        ("server_version", "15.0 (pgstash)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        msg::parameter_status(&mut out, name, value);
    }
    msg::backend_key_data(&mut out, 0, 0);
    msg::ready_for_query(&mut out, b'I');
    if send(&mut stream, &out).await.is_err() {
        return;
    }
    let mut discarding = false;
    loop {
        out.clear();
        loop {
            let frame = match split_frame(&mut buf, 1 << 20) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    msg::error_response(&mut out, Severity::Fatal, "08P01", &e.to_string());
                    let _ = send(&mut stream, &out).await;
                    return;
                }
            };
            match frame.tag {
                msg::TERMINATE => return,
                msg::QUERY => {
                    let text = msg::query_text(frame.body()).unwrap_or("").to_owned();
                    for command in text.split(';').map(str::trim).filter(|c| !c.is_empty()) {
                        match run(command, &proxy).await {
                            Ok(reply) => encode(reply, &mut out),
                            Err(message) => {
                                msg::error_response(&mut out, Severity::Error, "42601", &message);
                                break;
                            }
                        }
                    }
                    msg::ready_for_query(&mut out, b'I');
                }
                msg::SYNC => {
                    discarding = false;
                    msg::ready_for_query(&mut out, b'I');
                }
                _ if discarding => {}
                _ => {
                    msg::error_response(
                        &mut out,
                        Severity::Error,
                        "0A000",
                        "the admin console speaks the simple query protocol only",
                    );
                    discarding = true;
                }
            }
        }
        if !out.is_empty() && send(&mut stream, &out).await.is_err() {
            return;
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn send(stream: &mut ClientStream, out: &[u8]) -> std::io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await
}

fn encode(reply: Reply, out: &mut BytesMut) {
    match reply {
        Reply::Done(tag) => msg::command_complete(out, &tag),
        Reply::Rows(table) => {
            let mut body = BytesMut::new();
            body.put_i16(table.columns.len() as i16);
            for name in &table.columns {
                body.put_slice(name.as_bytes());
                body.put_u8(0);
                body.put_u32(0);
                body.put_i16(0);
                body.put_u32(25); // text
                body.put_i16(-1);
                body.put_i32(-1);
                body.put_i16(0);
            }
            out.put_u8(msg::ROW_DESCRIPTION);
            out.put_i32(4 + body.len() as i32);
            out.put_slice(&body);
            for row in &table.rows {
                let mut body = BytesMut::new();
                body.put_i16(row.len() as i16);
                for value in row {
                    match value {
                        Some(v) => {
                            body.put_i32(v.len() as i32);
                            body.put_slice(v.as_bytes());
                        }
                        None => body.put_i32(-1),
                    }
                }
                out.put_u8(msg::DATA_ROW);
                out.put_i32(4 + body.len() as i32);
                out.put_slice(&body);
            }
            msg::command_complete(out, &format!("SHOW {}", table.rows.len()));
        }
    }
}

fn text(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

async fn run(command: &str, proxy: &Arc<Proxy>) -> Result<Reply, String> {
    let words: Vec<String> = command
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let raw: Vec<&str> = command.split_whitespace().collect();
    let arg = |i: usize| raw.get(i).map(|s| s.trim_matches('"').to_owned());
    match words
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["SHOW", "POOLS"] => Ok(Reply::Rows(show_pools(proxy))),
        ["SHOW", "CLIENTS"] => Ok(Reply::Rows(show_clients(proxy))),
        ["SHOW", "SERVERS"] => Ok(Reply::Rows(show_servers(proxy))),
        ["SHOW", "STATS"] => Ok(Reply::Rows(show_stats(proxy))),
        ["SHOW", "CONFIG"] => Ok(Reply::Rows(show_config(&proxy.config()))),
        ["SHOW", "CACHE"] => Ok(Reply::Rows(show_cache(proxy))),
        ["SHOW", "CACHED", "QUERIES"] => Ok(Reply::Rows(show_cached_queries(proxy))),
        ["SHOW", "HELP"] | ["SHOW"] => Ok(Reply::Rows(Table {
            columns: vec!["commands"],
            rows: vec![vec![text(COMMANDS)]],
        })),
        ["PAUSE", ..] | ["RESUME", ..] | ["RECONNECT", ..] => {
            let database = arg(1);
            for pool in proxy.pools.all() {
                if database
                    .as_deref()
                    .is_none_or(|d| d == pool.target.database)
                {
                    match words[0].as_str() {
                        "PAUSE" => pool.pause(true),
                        "RESUME" => pool.pause(false),
                        _ => pool.reconnect(),
                    }
                }
            }
            Ok(Reply::Done(words[0].clone()))
        }
        ["RELOAD"] => reload(proxy).map(Reply::Done),
        ["SHUTDOWN"] => {
            proxy.shutdown_requested.notify_one();
            Ok(Reply::Done("SHUTDOWN".into()))
        }
        ["CACHE", "FLUSH", ..] => {
            let cache = proxy.cache.as_ref().ok_or("the cache is disabled")?;
            let database = arg(2);
            let mut flushed = 0;
            for (name, oid) in cache.databases() {
                if database.as_deref().is_none_or(|d| d == name) {
                    cache.publish(oid, &[], true).await;
                    flushed += 1;
                }
            }
            if database.is_none() {
                cache.local.clear();
            }
            Ok(Reply::Done(format!("CACHE FLUSH {flushed}")))
        }
        ["CACHE", "INVALIDATE", _] => {
            let cache = proxy.cache.as_ref().ok_or("the cache is disabled")?;
            let target = arg(2).unwrap_or_default();
            let (database, table) = target
                .split_once('.')
                .ok_or("CACHE INVALIDATE takes database.table or database.schema.table")?;
            let (oid, tables) = cache
                .resolve_table(database, table)
                .ok_or_else(|| format!("no table {table} known in database {database}"))?;
            cache.publish(oid, &tables, false).await;
            Ok(Reply::Done("CACHE INVALIDATE".into()))
        }
        _ => Err(format!(
            "unknown admin command \"{command}\"; known: {COMMANDS}"
        )),
    }
}

fn show_pools(proxy: &Proxy) -> Table {
    let mode = format!("{:?}", proxy.config().pool.mode).to_lowercase();
    let rows = proxy
        .pools
        .all()
        .iter()
        .map(|p| {
            vec![
                text(&p.target.database),
                text(&p.target.user),
                text(p.clients.load(Ordering::Relaxed)),
                text(p.waiting.load(Ordering::Relaxed)),
                text(p.active_count()),
                text(p.idle_count()),
                text(p.size()),
                text(if p.is_paused() { "paused" } else { "running" }),
                text(if p.circuit_is_open() {
                    "open"
                } else {
                    "closed"
                }),
                text(&mode),
            ]
        })
        .collect();
    Table {
        columns: vec![
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "pool_size",
            "state",
            "circuit",
            "pool_mode",
        ],
        rows,
    }
}

fn show_clients(proxy: &Proxy) -> Table {
    let rows = proxy
        .clients()
        .iter()
        .map(|c| {
            let (addr, port) = c.addr.rsplit_once(':').unwrap_or((&c.addr, ""));
            let connected = c
                .connected_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            vec![
                text("C"),
                text(&c.user),
                text(&c.database),
                text(if c.attached.load(Ordering::Relaxed) {
                    "active"
                } else {
                    "idle"
                }),
                text(addr),
                text(port),
                text(connected),
                text(&c.application_name),
                text(c.id),
            ]
        })
        .collect();
    Table {
        columns: vec![
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connect_time",
            "application_name",
            "id",
        ],
        rows,
    }
}

fn show_servers(proxy: &Proxy) -> Table {
    let mut rows = Vec::new();
    for pool in proxy.pools.all() {
        for (id, age, idle) in pool.idle_servers() {
            rows.push(vec![
                text("S"),
                text(&pool.target.user),
                text(&pool.target.database),
                text("idle"),
                text(&pool.target.host),
                text(pool.target.port),
                text(id),
                text(age.as_secs()),
                text(idle.as_secs()),
            ]);
        }
        for _ in 0..pool.active_count() {
            rows.push(vec![
                text("S"),
                text(&pool.target.user),
                text(&pool.target.database),
                text("active"),
                text(&pool.target.host),
                text(pool.target.port),
                None,
                None,
                None,
            ]);
        }
    }
    Table {
        columns: vec![
            "type", "user", "database", "state", "addr", "port", "id", "age_s", "idle_s",
        ],
        rows,
    }
}

fn show_stats(proxy: &Proxy) -> Table {
    let rows = proxy
        .pools
        .all()
        .iter()
        .map(|p| {
            let s = &p.stats;
            vec![
                text(&p.target.database),
                text(&p.target.user),
                text(s.xacts.load(Ordering::Relaxed)),
                text(s.queries.load(Ordering::Relaxed)),
                text(s.bytes_received.load(Ordering::Relaxed)),
                text(s.bytes_sent.load(Ordering::Relaxed)),
                text(s.wait_us.load(Ordering::Relaxed)),
            ]
        })
        .collect();
    Table {
        columns: vec![
            "database",
            "user",
            "total_xact_count",
            "total_query_count",
            "total_received",
            "total_sent",
            "total_wait_time",
        ],
        rows,
    }
}

fn show_config(config: &Config) -> Table {
    let mut rows = Vec::new();
    if let Ok(toml::Value::Table(table)) = toml::from_str::<toml::Value>(&config.to_masked_toml()) {
        flatten("", &toml::Value::Table(table), &mut rows);
    }
    Table {
        columns: vec!["key", "value"],
        rows,
    }
}

fn flatten(prefix: &str, value: &toml::Value, rows: &mut Vec<Vec<Option<String>>>) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, rows);
            }
        }
        toml::Value::String(s) => rows.push(vec![text(prefix), text(s)]),
        other => rows.push(vec![text(prefix), text(other)]),
    }
}

fn show_cache(proxy: &Proxy) -> Table {
    let mut rows = Vec::new();
    if let Some(cache) = &proxy.cache {
        let s = &cache.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let (hits, misses) = (get(&s.hits), get(&s.misses));
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        let mut add = |k: &str, v: String| rows.push(vec![text(k), Some(v)]);
        add("entries", cache.local.entry_count().to_string());
        add("bytes", cache.local.weighted_size().to_string());
        add("hits", hits.to_string());
        add("misses", misses.to_string());
        add("bypasses", get(&s.bypasses).to_string());
        add("hit_ratio", format!("{ratio:.4}"));
        add("fills", get(&s.fills).to_string());
        add("fills_discarded", get(&s.fills_discarded).to_string());
        add("invalidations", get(&s.invalidations).to_string());
        add("evictions", cache.local.evictions().to_string());
        if let Some(shared) = &cache.shared {
            let r = &shared.stats;
            add("redis_hits", get(&r.hits).to_string());
            add("redis_misses", get(&r.misses).to_string());
            add("redis_errors", get(&r.errors).to_string());
            add("redis_corrupt", get(&r.corrupt).to_string());
            add("redis_stored", get(&r.stored).to_string());
            add("redis_lookups_skipped", get(&r.skipped).to_string());
            add("redis_stores_deferred", get(&r.deferred).to_string());
            if let Some(polled) = shared.busy_polled() {
                add("redis_busy_polled_us", polled.as_micros().to_string());
            }
            add(
                "redis_circuit",
                if shared.circuit_open() {
                    "open"
                } else {
                    "closed"
                }
                .to_string(),
            );
            add(
                "bus_healthy",
                shared.bus_healthy.load(Ordering::Relaxed).to_string(),
            );
        }
    }
    Table {
        columns: vec!["name", "value"],
        rows,
    }
}

fn show_cached_queries(proxy: &Proxy) -> Table {
    let rows = proxy
        .cache
        .as_ref()
        .map(|cache| {
            cache
                .top_shapes(50)
                .into_iter()
                .map(|s| {
                    vec![
                        text(&s.text),
                        text(s.hits),
                        text(s.misses),
                        s.bypass.map(|r| r.as_str().to_string()),
                        text(format!("{:.3}", s.saved_ms())),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    Table {
        columns: vec!["query", "hits", "misses", "bypass_reason", "avg_saved_ms"],
        rows,
    }
}

/// The settings that differ between `old` and `fresh` but only take
/// effect in a new process.
fn restart_needed_for(old: &Config, fresh: &Config) -> Vec<&'static str> {
    let mut needs_restart = Vec::new();
    if fresh.worker_threads != old.worker_threads {
        needs_restart.push("worker_threads");
    }
    // The shared tier keeps the settings it started with.
    if fresh.redis != old.redis {
        needs_restart.push("[redis]");
    }
    if fresh.cache.enabled != old.cache.enabled
        || fresh.cache.capacity_bytes != old.cache.capacity_bytes
    {
        needs_restart.push("cache.enabled/capacity_bytes");
    }
    if fresh.upstream.sslmode != old.upstream.sslmode
        || fresh.upstream.sslrootcert != old.upstream.sslrootcert
    {
        needs_restart.push("upstream.sslmode/sslrootcert (pools already open)");
    }
    needs_restart
}

/// Re-reads the configuration file and applies what can change live.
pub fn reload(proxy: &Proxy) -> Result<String, String> {
    let path = proxy.config_path.get().cloned();
    let mut fresh = Config::load(path.as_deref()).map_err(|e| e.to_string())?;
    let old = proxy.config();
    // What came from the command line stays.
    fresh.listen = old.listen.clone();
    fresh.metrics_listen = old.metrics_listen.clone();
    if fresh.upstream.host.is_empty() {
        fresh.upstream = old.upstream.clone();
    }
    if fresh.redis.url.is_empty() {
        fresh.redis.url = old.redis.url.clone();
    }
    let needs_restart = restart_needed_for(&old, &fresh);
    for pool in proxy.pools.all() {
        let database = proxy
            .clients()
            .iter()
            .find(|c| c.user == pool.target.user)
            .map(|c| c.database.clone())
            .unwrap_or_else(|| pool.target.database.clone());
        pool.resize(fresh.pool_size_for(&database, &pool.target.user));
    }
    proxy.reload_security(&fresh)?;
    if let Some(cache) = &proxy.cache {
        cache.config.store(Arc::new(fresh.cache.clone()));
    }
    crate::admin::logging::set_level(&fresh.log_level);
    proxy.replace_config(fresh);
    if needs_restart.is_empty() {
        tracing::info!("configuration reloaded");
        Ok("RELOAD".into())
    } else {
        tracing::warn!(settings = ?needs_restart, "configuration reloaded; these need a restart");
        Ok(format!(
            "RELOAD (restart needed for: {})",
            needs_restart.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_a_running_process_keeps_are_named_on_reload() {
        let old = Config::default();
        let mut fresh = old.clone();
        fresh.pool.size += 1;
        assert!(restart_needed_for(&old, &fresh).is_empty());
        fresh.worker_threads = 1;
        fresh.redis.admit = "reuse".into();
        assert_eq!(
            restart_needed_for(&old, &fresh),
            ["worker_threads", "[redis]"]
        );
    }
}
