//! Configuration: one documented serde struct per `proxy.toml` section,
//! environment overrides (`PGSTASH_SECTION__KEY`) and the CLI shortcuts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The shortest `redis.heartbeat`: the bus is trusted for three of them,
/// on a clock that may lag by up to `clock::COARSE_SLACK_MS`.
const MIN_HEARTBEAT: Duration = Duration::from_millis(20);

pub use crate::tls::{ClientTlsMode, UpstreamSslMode};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole of `proxy.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to.
    pub listen: String,
    /// Client connections beyond this are refused with SQLSTATE 53300.
    pub max_client_conn: usize,
    /// Largest protocol message accepted from a client or a server, in bytes.
    pub max_message_size: usize,
    /// A client must finish its startup within this time.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// On SIGTERM, /readyz fails at once but new clients are still accepted
    /// this long, so the pod's endpoints are updated before the listener
    /// closes.
    #[serde(with = "humantime_serde")]
    pub drain_grace: Duration,
    /// On SIGTERM, in-flight transactions get this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz); empty
    /// turns it off.
    pub metrics_listen: String,
    /// Statements slower than this upstream are logged (shape and
    /// duration, never literals); 0 turns the slow-query log off.
    #[serde(with = "humantime_serde")]
    pub slow_query_threshold: Duration,
    /// Threads that run sessions; 0: one per CPU the process may use
    /// (CPU quotas count).
    pub worker_threads: usize,
    /// Log format: "text" or "json".
    pub log_format: String,
    /// Default tracing filter, e.g. "info" or "pgstash=debug".
    pub log_level: String,
    pub upstream: UpstreamConfig,
    pub pool: PoolConfig,
    pub cache: CacheConfig,
    pub redis: RedisConfig,
    pub admin: AdminConfig,
    pub auth: AuthConfig,
    pub tls: ClientTlsConfig,
    pub audit: AuditConfig,
    /// Client database name → upstream database.
    pub databases: BTreeMap<String, DatabaseConfig>,
    /// User name → upstream credentials.
    pub users: BTreeMap<String, UserConfig>,
}

/// The server used for client databases not listed under `[databases]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Empty means: only databases listed under `[databases]` are served.
    pub host: String,
    pub port: u16,
    /// Password used upstream for users without one of their own.
    pub password: Option<String>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS to Postgres: disable, prefer, require, verify-ca, verify-full.
    pub sslmode: UpstreamSslMode,
    /// CA certificates (PEM) for verify-ca and verify-full.
    pub sslrootcert: String,
    /// Client certificate and key (PEM) presented to Postgres, if any.
    pub sslcert: String,
    pub sslkey: String,
}

/// TLS towards clients.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// disable, allow, prefer or require.
    pub mode: ClientTlsMode,
    /// Certificate chain and private key (PEM); read again on reload.
    pub cert_file: String,
    pub key_file: String,
}

/// Client authentication methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    Trust,
    Reject,
    /// Cleartext password (only sensible over TLS).
    Password,
    /// MD5 challenge; a user whose secret is a SCRAM verifier gets SCRAM,
    /// as in Postgres.
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// One address rule, like a line of pg_hba.conf; the first rule that
/// matches a client's database, user and address decides its method.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRule {
    /// Client database name, or "all".
    #[serde(default = "all")]
    pub database: String,
    /// User name, or "all".
    #[serde(default = "all")]
    pub user: String,
    /// Client network in CIDR form ("10.0.0.0/8", "::1/128"), or "all".
    #[serde(default = "all")]
    pub address: String,
    pub method: AuthMethod,
}

fn all() -> String {
    "all".into()
}

/// Who may log in, and where their secrets come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Method for every client when `rules` is empty.
    pub method: AuthMethod,
    /// Address rules; with rules, a client no rule matches is refused.
    pub rules: Vec<AuthRule>,
    /// Iterations used for SCRAM secrets derived from plain passwords.
    pub scram_iterations: u32,
    /// PgBouncer `userlist.txt`: `"user" "secret"` per line, where the
    /// secret is a password, `md5…` or a `SCRAM-SHA-256$…` verifier.
    pub auth_file: String,
    /// Asked for users found neither in `[users]` nor in `auth_file`, with
    /// the user name as $1; must return (name, secret), e.g.
    /// `SELECT usename, passwd FROM pg_shadow WHERE usename = $1`.
    pub auth_query: String,
    /// The user pgstash runs `auth_query` as (its password from `[users]`).
    pub auth_user: String,
    /// Database `auth_query` runs in; empty: the client's database.
    pub auth_dbname: String,
    /// How long an `auth_query` answer is reused.
    #[serde(with = "humantime_serde")]
    pub auth_query_cache: Duration,
    /// Every failed login is answered after this delay, whether or not the
    /// user exists.
    #[serde(with = "humantime_serde")]
    pub failure_delay: Duration,
    /// Repeated failures from one address double the delay up to this.
    #[serde(with = "humantime_serde")]
    pub failure_delay_max: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            method: AuthMethod::Trust,
            rules: Vec::new(),
            scram_iterations: 4096,
            auth_file: String::new(),
            auth_query: String::new(),
            auth_user: String::new(),
            auth_dbname: String::new(),
            auth_query_cache: Duration::from_secs(10),
            failure_delay: Duration::from_millis(200),
            failure_delay_max: Duration::from_secs(5),
        }
    }
}

/// The audit log: logins and DDL/privilege statements, one JSON object
/// per line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// "" (off), "stdout", or a file path (appended to).
    pub destination: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection belongs to a client for one transaction.
    Transaction,
    /// A server connection belongs to a client for its whole life.
    Session,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Server connections per (database, user).
    pub size: usize,
    /// Idle server connections kept open per (database, user).
    pub min_idle: usize,
    /// Idle server connections above `min_idle` are closed after this.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Server connections are closed (when idle) after this age.
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// How long a client may wait for a server connection.
    #[serde(with = "humantime_serde")]
    pub query_wait_timeout: Duration,
    /// A connection idle longer than this is checked before reuse.
    #[serde(with = "humantime_serde")]
    pub server_check_delay: Duration,
    /// Consecutive connect failures that open the circuit.
    pub circuit_failures: u32,
    /// How long an open circuit fails clients fast before trying again.
    #[serde(with = "humantime_serde")]
    pub circuit_open_for: Duration,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Defaults to `[upstream].host`.
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Upstream database name; defaults to the client's.
    pub dbname: Option<String>,
    /// Overrides `[pool].size` for this database.
    pub pool_size: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    /// Password pgstash uses to log in to Postgres as this user.
    pub password: Option<String>,
    /// Overrides `[pool].size` for this user.
    pub pool_size: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:6432".into(),
            max_client_conn: 10_000,
            max_message_size: 256 * 1024 * 1024,
            startup_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            drain_grace: Duration::ZERO,
            metrics_listen: String::new(),
            slow_query_threshold: Duration::ZERO,
            worker_threads: 0,
            log_format: "text".into(),
            log_level: "info".into(),
            upstream: UpstreamConfig::default(),
            pool: PoolConfig::default(),
            cache: CacheConfig::default(),
            redis: RedisConfig::default(),
            admin: AdminConfig::default(),
            auth: AuthConfig::default(),
            tls: ClientTlsConfig::default(),
            audit: AuditConfig::default(),
            databases: BTreeMap::new(),
            users: BTreeMap::new(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            host: String::new(),
            port: 5432,
            password: None,
            connect_timeout: Duration::from_secs(5),
            sslmode: UpstreamSslMode::Disable,
            sslrootcert: String::new(),
            sslcert: String::new(),
            sslkey: String::new(),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            size: 20,
            min_idle: 2,
            idle_timeout: Duration::from_secs(30),
            server_lifetime: Duration::from_secs(3600),
            query_wait_timeout: Duration::from_secs(30),
            server_check_delay: Duration::from_secs(30),
            circuit_failures: 5,
            circuit_open_for: Duration::from_secs(2),
        }
    }
}

/// The result cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Bytes of results held in the local (in-process) tier.
    pub capacity_bytes: u64,
    /// How long an entry may be served; the last safety net for writes that
    /// bypass pgstash.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Results larger than this are passed through, not stored.
    pub max_entry_size: usize,
    /// Statement analyses remembered (by statement shape).
    pub analysis_capacity: u64,
    /// How long concurrent misses for one key wait for the first one.
    #[serde(with = "humantime_serde")]
    pub single_flight_timeout: Duration,
    /// User functions to treat as immutable ("schema.name" or "name").
    pub immutable_functions: Vec<String>,
    /// Per-database and per-table rules; the first matching rule applies.
    pub rules: Vec<CacheRule>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheRule {
    /// Client database name; any if absent.
    pub database: Option<String>,
    /// "schema.table" or "table"; any if absent.
    pub table: Option<String>,
    /// false: never cache queries that read a matching table.
    pub cache: Option<bool>,
    /// TTL for results that read a matching table (the shortest wins).
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Cache a table with row-level security anyway: only sound when its
    /// policies depend on nothing but the role (which is part of the key).
    pub allow_rls: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            capacity_bytes: 256 * 1024 * 1024,
            default_ttl: Duration::from_secs(60),
            max_entry_size: 1024 * 1024,
            analysis_capacity: 10_000,
            single_flight_timeout: Duration::from_secs(1),
            immutable_functions: Vec::new(),
            rules: Vec::new(),
        }
    }
}

/// The admin console: the virtual database `pgstash`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Users allowed in; empty means any user.
    pub users: Vec<String>,
    /// Accept admin connections from other hosts than this one.
    pub allow_remote: bool,
}

/// The shared tier and invalidation bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` (`rediss://` for TLS).
    /// Several URLs separated by commas with `cluster = true` name the
    /// seed nodes of a Redis Cluster. Empty: no shared tier, and
    /// invalidation stays within this process.
    pub url: String,
    pub cluster: bool,
    /// With Redis Sentinel: the monitored master's name; `url` then lists
    /// the sentinels, and pgstash follows the master they report.
    pub sentinel_master: String,
    /// Prefix of every key and of the invalidation channel.
    pub prefix: String,
    /// A Redis command slower than this counts as a failure.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long publishing a write may take (three tries): a lost bump
    /// would leave other instances serving what the write changed.
    #[serde(with = "humantime_serde")]
    pub bump_timeout: Duration,
    /// Consecutive failures that open the circuit; while open, Redis is not
    /// asked and costs nothing. Commands in flight together when they
    /// failed count as one.
    pub circuit_failures: u32,
    #[serde(with = "humantime_serde")]
    pub circuit_open_for: Duration,
    /// While Redis is unreachable: "pass-through" (no caching; nothing can
    /// go stale) or "local" (the local tier keeps serving with
    /// `degraded_ttl`, so writes through other pods may be missed for that
    /// long).
    pub on_failure: String,
    #[serde(with = "humantime_serde")]
    pub degraded_ttl: Duration,
    /// Every pgstash announces itself on the bus this often; a pgstash that
    /// has heard nothing on the bus for three times as long stops trusting
    /// its local tier. This bounds how long a stalled subscription can
    /// leave it serving results another pgstash has invalidated.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Entries announced on the bus that this instance remembers, so that
    /// a lookup of an entry nobody stored skips Redis; 0 always asks.
    pub presence_capacity: u64,
    /// Results at least this large (bytes, and at most 64 MiB) are stored
    /// LZ4-compressed when that makes them smaller; 0 never compresses.
    pub compress_above: usize,
    /// Which results go to Redis: "fill" (every result filled here) or
    /// "reuse" (only results this instance reads again: a local-tier hit,
    /// or a second fill of the same entry).
    pub admit: String,
    /// How long a worker thread keeps polling for a Redis lookup's reply
    /// instead of sleeping until it arrives; 0 (the default) never polls.
    /// Polling saves the wake-up of a sleeping thread on every lookup,
    /// which pays off when Redis answers within this time (same host,
    /// spare CPU) and only costs CPU when it does not.
    #[serde(with = "humantime_serde")]
    pub busy_poll: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            cluster: false,
            sentinel_master: String::new(),
            prefix: "pgstash:".into(),
            timeout: Duration::from_millis(25),
            connect_timeout: Duration::from_millis(500),
            bump_timeout: Duration::from_millis(500),
            circuit_failures: 3,
            circuit_open_for: Duration::from_secs(2),
            on_failure: "pass-through".into(),
            degraded_ttl: Duration::from_secs(1),
            heartbeat: Duration::from_millis(50),
            presence_capacity: 500_000,
            compress_above: 1024,
            admit: "fill".into(),
            busy_poll: Duration::ZERO,
        }
    }
}

/// Where a client's (database, user) pair goes upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
}

impl Config {
    /// Reads `path` (if any), applies `PGSTASH_*` overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::from_toml_and_env(&text, &env)
    }

    pub fn from_toml_and_env(text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for (name, value) in env {
            if let Some(path) = name.strip_prefix("PGSTASH_") {
                // PGSTASH_CONFIG names the file itself.
                if path == "CONFIG" {
                    continue;
                }
                if !is_known_setting(path) {
                    // Other tools share the prefix (test harnesses, wrappers):
                    // a variable that names no setting is not ours.
                    eprintln!("pgstash: ignoring PGSTASH_{path}: no such setting");
                    continue;
                }
                apply_override(&mut table, path, value);
            }
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid(format!("listen = {:?} is not HOST:PORT", self.listen));
        }
        if !self.metrics_listen.is_empty()
            && self.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return invalid(format!(
                "metrics_listen = {:?} is not HOST:PORT",
                self.metrics_listen
            ));
        }
        if self.worker_threads > 1024 {
            return invalid(format!(
                "worker_threads = {}: at most 1024",
                self.worker_threads
            ));
        }
        if !matches!(self.redis.admit.as_str(), "fill" | "reuse") {
            return invalid(format!(
                "redis.admit = {:?}: expected \"fill\" or \"reuse\"",
                self.redis.admit
            ));
        }
        if self.redis.busy_poll > self.redis.timeout {
            // A reply later than the timeout is a failure anyway.
            return invalid(format!(
                "redis.busy_poll = {:?}: at most redis.timeout ({:?})",
                self.redis.busy_poll, self.redis.timeout
            ));
        }
        if self.redis.heartbeat < MIN_HEARTBEAT {
            // The bus is trusted for three heartbeats, read on a clock
            // that may lag by a few milliseconds.
            return invalid(format!(
                "redis.heartbeat = {:?}: at least {MIN_HEARTBEAT:?}",
                self.redis.heartbeat
            ));
        }
        if !matches!(self.redis.on_failure.as_str(), "pass-through" | "local") {
            return invalid(format!(
                "redis.on_failure = {:?}: expected \"pass-through\" or \"local\"",
                self.redis.on_failure
            ));
        }
        if self.redis.cluster && self.redis.prefix.contains(['{', '}']) {
            // A hash tag in the prefix would pull every key into one slot
            // and break the bus's own tag.
            return invalid(format!(
                "redis.prefix = {:?}: no braces with cluster = true",
                self.redis.prefix
            ));
        }
        if self.pool.size == 0 {
            return invalid("pool.size must be at least 1".into());
        }
        if self.max_message_size < 1024 {
            return invalid("max_message_size must be at least 1024".into());
        }
        if self.tls.mode != ClientTlsMode::Disable
            && (self.tls.cert_file.is_empty() || self.tls.key_file.is_empty())
        {
            return invalid(
                "tls.mode other than disable needs tls.cert_file and tls.key_file".into(),
            );
        }
        for rule in &self.auth.rules {
            if rule.address != "all" && rule.address.parse::<ipnet::IpNet>().is_err() {
                return invalid(format!(
                    "auth rule address {:?} is not a CIDR network or \"all\"",
                    rule.address
                ));
            }
        }
        if !self.auth.auth_query.is_empty() && self.auth.auth_user.is_empty() {
            return invalid("auth.auth_query needs auth.auth_user".into());
        }
        for (name, db) in &self.databases {
            if db.host.is_none() && self.upstream.host.is_empty() {
                return invalid(format!(
                    "database {name:?} has no host and [upstream] sets none"
                ));
            }
        }
        Ok(())
    }

    /// Applies `--upstream postgres://[user[:password]@]host:port[/database]`.
    pub fn apply_upstream_url(&mut self, url: &str) -> Result<(), ConfigError> {
        let parsed =
            url::Url::parse(url).map_err(|e| ConfigError::Invalid(format!("--upstream: {e}")))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(ConfigError::Invalid(
                "--upstream must be a postgres:// URL".into(),
            ));
        }
        self.upstream.host = parsed
            .host_str()
            .ok_or_else(|| ConfigError::Invalid("--upstream has no host".into()))?
            .to_owned();
        self.upstream.port = parsed.port().unwrap_or(5432);
        if let Some(password) = parsed.password() {
            let decoded = percent_decode(password);
            self.upstream.password = Some(decoded.clone());
            if !parsed.username().is_empty() {
                let user = percent_decode(parsed.username());
                self.users.entry(user).or_default().password = Some(decoded);
            }
        }
        Ok(())
    }

    /// Resolves where a client's database and user go, or `None` if the
    /// database is not served.
    pub fn target(&self, database: &str, user: &str) -> Option<Target> {
        let (host, port, dbname) = match self.databases.get(database) {
            Some(db) => (
                db.host
                    .clone()
                    .unwrap_or_else(|| self.upstream.host.clone()),
                db.port.unwrap_or(self.upstream.port),
                db.dbname.clone().unwrap_or_else(|| database.to_owned()),
            ),
            None if !self.upstream.host.is_empty() => (
                self.upstream.host.clone(),
                self.upstream.port,
                database.to_owned(),
            ),
            None => return None,
        };
        Some(Target {
            host,
            port,
            database: dbname,
            user: user.to_owned(),
        })
    }

    pub fn password_for(&self, user: &str) -> Option<String> {
        self.users
            .get(user)
            .and_then(|u| u.password.clone())
            .or_else(|| self.upstream.password.clone())
    }

    /// How pgstash logs in to Postgres as `user` from the configuration
    /// alone. A SCRAM verifier is no password: such users are logged in
    /// with the keys their own clients prove.
    pub fn upstream_secret_for(
        &self,
        user: &str,
    ) -> Option<crate::upstream::connection::UpstreamSecret> {
        use crate::auth::Secret;
        use crate::upstream::connection::UpstreamSecret;
        match Secret::parse(&self.password_for(user)?) {
            Secret::Plain(p) => Some(UpstreamSecret::Password(p)),
            Secret::Md5(h) => Some(UpstreamSecret::Md5Hash(h)),
            Secret::Scram(_) => None,
        }
    }

    pub fn pool_size_for(&self, database: &str, user: &str) -> usize {
        self.users
            .get(user)
            .and_then(|u| u.pool_size)
            .or_else(|| self.databases.get(database).and_then(|d| d.pool_size))
            .unwrap_or(self.pool.size)
    }

    /// The effective configuration as TOML, with every password masked.
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        let mask = |p: &mut Option<String>| {
            if p.is_some() {
                *p = Some("********".into());
            }
        };
        mask(&mut masked.upstream.password);
        if let Ok(mut url) = url::Url::parse(&masked.redis.url) {
            if url.password().is_some() {
                let _ = url.set_password(Some("********"));
                masked.redis.url = url.to_string();
            }
        }
        for user in masked.users.values_mut() {
            mask(&mut user.password);
        }
        toml::to_string_pretty(&masked).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_owned())
}

/// `PGSTASH_POOL__MIN_IDLE=4` sets `pool.min_idle`; `__` separates levels,
/// so keys that contain `_` stay unambiguous.
fn apply_override(table: &mut toml::Table, path: &str, value: &str) {
    let lowered = path.to_ascii_lowercase();
    let mut parts: Vec<&str> = lowered.split("__").collect();
    let Some(last) = parts.pop() else { return };
    let mut current = table;
    for part in parts {
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(next) = entry else {
            return;
        };
        current = next;
    }
    // Secrets and addresses are strings even when they look like numbers.
    let textual = [
        "password",
        "url",
        "host",
        "prefix",
        "dbname",
        "listen",
        "metrics_listen",
        "cert_file",
        "key_file",
        "auth_file",
        "auth_query",
        "auth_user",
        "destination",
        "sslrootcert",
        "sslcert",
        "sslkey",
    ];
    let parsed = if textual.contains(&last) {
        toml::Value::String(value.to_owned())
    } else {
        parse_env_value(value)
    };
    current.insert(last.to_owned(), parsed);
}

/// Whether `SECTION__KEY` is meant for pgstash's configuration: its top
/// level must exist there (the maps `databases` and `users` may be empty).
fn is_known_setting(path: &str) -> bool {
    let lowered = path.to_ascii_lowercase();
    let mut parts = lowered.split("__");
    let Some(first) = parts.next() else {
        return false;
    };
    let Ok(toml::Value::Table(defaults)) = toml::Value::try_from(Config::default()) else {
        return false;
    };
    match defaults.get(first) {
        // Within a known section, a misspelt key is refused with a clear
        // error by the deserialiser, as in the file.
        Some(toml::Value::Table(_)) => parts.next().is_some(),
        Some(_) => parts.next().is_none(),
        // Empty maps and unset options do not appear in the defaults.
        None => matches!(first, "databases" | "users"),
    }
}

fn parse_env_value(value: &str) -> toml::Value {
    if let Ok(i) = value.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(b) = value.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    toml::Value::String(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_file() {
        let env = vec![
            ("PGSTASH_POOL__SIZE".to_string(), "7".to_string()),
            ("PGSTASH_POOL__IDLE_TIMEOUT".to_string(), "5s".to_string()),
            ("PGSTASH_LISTEN".to_string(), "127.0.0.1:7000".to_string()),
        ];
        let config =
            Config::from_toml_and_env("[pool]\nsize = 3\nmode = \"session\"\n", &env).unwrap();
        assert_eq!(config.pool.size, 7);
        assert_eq!(config.pool.idle_timeout, Duration::from_secs(5));
        assert_eq!(config.pool.mode, PoolMode::Session);
        assert_eq!(config.listen, "127.0.0.1:7000");
    }

    #[test]
    fn upstream_url_fills_pass_through() {
        let mut config = Config::default();
        config
            .apply_upstream_url("postgres://bob:s%40cret@db.local:5433")
            .unwrap();
        let target = config.target("anydb", "carol").unwrap();
        assert_eq!((target.host.as_str(), target.port), ("db.local", 5433));
        assert_eq!(target.database, "anydb");
        assert_eq!(config.password_for("bob").as_deref(), Some("s@cret"));
        assert!(config.to_masked_toml().contains("********"));
        assert!(!config.to_masked_toml().contains("s@cret"));
    }

    #[test]
    fn foreign_environment_variables_are_ignored() {
        let env = vec![
            ("PGSTASH_TEST_LOG".to_string(), "debug".to_string()),
            ("PGSTASH_CONFIG".to_string(), "/x.toml".to_string()),
            ("PGSTASH_USERS__APP__PASSWORD".to_string(), "s".to_string()),
            (
                "PGSTASH_REDIS__URL".to_string(),
                "redis://r:6379".to_string(),
            ),
            (
                "PGSTASH_UPSTREAM__PASSWORD".to_string(),
                "12345".to_string(),
            ),
            (
                "PGSTASH_PORT".to_string(),
                "tcp://10.0.0.1:6432".to_string(),
            ),
        ];
        let config = Config::from_toml_and_env("", &env).unwrap();
        assert_eq!(config.password_for("app").as_deref(), Some("s"));
        assert_eq!(config.redis.url, "redis://r:6379");
        assert_eq!(config.upstream.password.as_deref(), Some("12345"));
    }

    #[test]
    fn worker_threads_are_bounded() {
        let config = Config::from_toml_and_env("worker_threads = 1\n", &[]).unwrap();
        assert_eq!(config.worker_threads, 1);
        assert_eq!(Config::default().worker_threads, 0, "one per CPU");
        assert!(Config::from_toml_and_env("worker_threads = 5000\n", &[]).is_err());
    }

    #[test]
    fn busy_poll_is_off_by_default_and_within_the_redis_timeout() {
        assert_eq!(Config::default().redis.busy_poll, Duration::ZERO);
        let on = Config::from_toml_and_env("[redis]\nbusy_poll = \"50us\"\n", &[]).unwrap();
        assert_eq!(on.redis.busy_poll, Duration::from_micros(50));
        let past = "[redis]\ntimeout = \"10ms\"\nbusy_poll = \"20ms\"\n";
        assert!(Config::from_toml_and_env(past, &[]).is_err());
    }

    #[test]
    fn heartbeats_outlast_the_coarse_clock() {
        assert!(Config::from_toml_and_env("[redis]\nheartbeat = \"5ms\"\n", &[]).is_err());
        assert!(Config::from_toml_and_env("[redis]\nheartbeat = \"20ms\"\n", &[]).is_ok());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(Config::from_toml_and_env("[pool]\nsise = 3\n", &[]).is_err());
    }
}
