//! pgstash: a caching, pooling sidecar proxy for PostgreSQL.
//!
//! # Layout
//!
//! - [`config`]: `proxy.toml`, environment overrides, CLI shortcuts.
//! - [`listener`]: accept loop, client limits, graceful shutdown.
//! - [`protocol`]: frame splitting, the few typed message views, outgoing
//!   batches.
//! - [`session`]: one task per client: startup, then relaying frames.
//! - [`upstream`]: authenticated server connections and their pools.
//! - [`sql`]: what statements do to a session (settings, pinning).
//! - [`cache`]: statement analysis, catalog knowledge, keys, the local
//!   tier and invalidation by table generation.
//! - [`admin`]: metrics and the HTTP endpoint.
//! - [`auth`]: client authentication: address rules, secrets, SCRAM/MD5.
//! - [`tls`]: TLS towards clients and towards Postgres.
//! - [`audit`]: the audit log of logins and privileged statements.
//!
//! # The path of a query
//!
//! A client's bytes are split into frames ([`protocol::frame`]). The
//! session takes a server connection from the pool on the first message of
//! a transaction (replaying the client's settings if the server's differ),
//! forwards the frames unchanged — or, for named prepared statements,
//! rewritten to a name shared by every client — and relays the server's
//! answer back, frame for frame. When ReadyForQuery reports the server idle
//! with nothing else in flight, the connection goes back to the pool.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod cache;
pub mod clock;
pub mod config;
pub mod listener;
pub mod protocol;
pub mod session;
pub mod sql;
pub mod tls;
pub mod upstream;

/// Maps and sets on the per-query path. Their keys are hashes already, or
/// names a client chose within its own session: foldhash with a seed
/// drawn per process is enough there, and far cheaper than SipHash.
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastHasher>;
pub type FastSet<K> = std::collections::HashSet<K, FastHasher>;
/// The hasher of those maps and of the moka caches keyed by statement
/// hashes.
pub type FastHasher = foldhash::fast::RandomState;
