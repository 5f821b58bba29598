//! Client authentication: which method applies (address rules like
//! pg_hba.conf), where a user's secret comes from (`[users]`, PgBouncer's
//! auth file, `auth_query`), and the password exchanges themselves (SCRAM
//! and MD5 from pgwire). A successful login also yields what pgstash can
//! use to log in to Postgres as that user.

pub mod scram;
pub mod secret;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pgwire::api::auth::sasl::scram::{gen_salted_password, ScramSecret, ScramServerAuth};
use pgwire::error::PgWireError;
use pgwire::messages::startup::Authentication;
use pgwire::messages::Message;
use tokio::io::AsyncWriteExt;

use crate::config::{AuthConfig, AuthMethod, Config};
use crate::protocol::frame::split_frame;
use crate::tls::ClientStream;
use crate::upstream::connection::UpstreamSecret;
pub use secret::{ScramVerifier, Secret};

/// Longest password-family message accepted: far above any real SCRAM
/// message or password, far below what could hurt.
const MAX_AUTH_MESSAGE: usize = 16 * 1024;

const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// Why a login did not go through.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Reported to the client as FATAL with this SQLSTATE.
    #[error("{code}: {message}")]
    Refused { code: &'static str, message: String },
    /// The client went away or broke the connection mid-exchange.
    #[error("client i/o during authentication: {0}")]
    Io(#[from] std::io::Error),
}

/// A client that proved who it is.
#[derive(Debug)]
pub struct LoginOk {
    pub method: AuthMethod,
    /// What pgstash now knows to log in to Postgres as the same user.
    pub upstream: Option<UpstreamSecret>,
}

/// One address rule, parsed.
struct Rule {
    database: String,
    user: String,
    network: Option<ipnet::IpNet>,
    method: AuthMethod,
}

/// Recent failed logins per client address.
#[derive(Default)]
pub struct FailureLog {
    by_address: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Failures older than this no longer slow an address down.
const FAILURE_MEMORY: Duration = Duration::from_secs(60);

impl FailureLog {
    /// Records a failure and returns how long to wait before answering it.
    fn failed(&self, address: IpAddr, base: Duration, max: Duration) -> Duration {
        let now = Instant::now();
        let mut map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, (_, at)| now.duration_since(*at) < FAILURE_MEMORY);
        }
        let entry = map.entry(address).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURE_MEMORY {
            entry.0 = 0;
        }
        let previous = entry.0;
        *entry = (previous.saturating_add(1), now);
        base.saturating_mul(1u32 << previous.min(16))
            .min(max.max(base))
    }

    fn succeeded(&self, address: IpAddr) {
        self.by_address
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&address);
    }
}

/// Rules, secrets and SCRAM settings of one configuration generation.
pub struct Authenticator {
    config: AuthConfig,
    rules: Vec<Rule>,
    configured: HashMap<String, Secret>,
    from_file: HashMap<String, Secret>,
    queried: Mutex<HashMap<String, (Instant, Option<Secret>)>>,
    /// SCRAM salted passwords derived from plain passwords, by user and
    /// password: deriving one takes thousands of hash iterations, so it is
    /// done once, not at every login.
    salted: Mutex<HashMap<(String, String), Vec<u8>>>,
    failures: Arc<FailureLog>,
    /// Key for the salts of users without a stored one (unknown users and
    /// plain passwords), so every user always sees the same salt.
    salt_key: Arc<[u8; 32]>,
    scram_plain: ScramServerAuth,
    /// Offers SCRAM-SHA-256-PLUS, bound to the client-facing certificate.
    scram_tls: Option<ScramServerAuth>,
}

impl Authenticator {
    /// Builds the authenticator for `config`; failure state and salts carry
    /// over from `previous` so a reload does not reset them.
    pub fn load(
        config: &Config,
        certificate_pem: Option<&[u8]>,
        previous: Option<&Authenticator>,
    ) -> Result<Authenticator, String> {
        let auth = &config.auth;
        let rules = auth
            .rules
            .iter()
            .map(|r| {
                let network = match r.address.as_str() {
                    "all" => None,
                    text => Some(
                        text.parse::<ipnet::IpNet>()
                            .map_err(|e| format!("{text}: {e}"))?,
                    ),
                };
                Ok(Rule {
                    database: r.database.clone(),
                    user: r.user.clone(),
                    network,
                    method: r.method,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let configured = config
            .users
            .iter()
            .filter_map(|(name, u)| Some((name.clone(), Secret::parse(u.password.as_ref()?))))
            .collect();
        let from_file = if auth.auth_file.is_empty() {
            HashMap::new()
        } else {
            let text = std::fs::read_to_string(&auth.auth_file)
                .map_err(|e| format!("auth_file {}: {e}", auth.auth_file))?;
            secret::parse_userlist(&text)
                .map_err(|e| format!("auth_file {}: {e}", auth.auth_file))?
        };
        let mut scram_plain = ScramServerAuth::new();
        scram_plain.set_iterations(auth.scram_iterations as usize);
        let scram_tls = match certificate_pem {
            Some(pem) => {
                let mut server = scram_plain.clone();
                server
                    .configure_certificate(pem)
                    .map_err(|e| format!("channel binding: {e}"))?;
                Some(server)
            }
            None => None,
        };
        Ok(Authenticator {
            config: auth.clone(),
            rules,
            configured,
            from_file,
            queried: Mutex::new(HashMap::new()),
            salted: Mutex::new(HashMap::new()),
            failures: previous.map_or_else(Default::default, |p| p.failures.clone()),
            salt_key: previous.map_or_else(|| Arc::new(rand::random()), |p| p.salt_key.clone()),
            scram_plain,
            scram_tls,
        })
    }

    /// The method for a client, or `None` when no rule admits it.
    pub fn method_for(&self, database: &str, user: &str, address: IpAddr) -> Option<AuthMethod> {
        if self.rules.is_empty() {
            return Some(self.config.method);
        }
        self.rules
            .iter()
            .find(|r| {
                (r.database == "all" || r.database == database)
                    && (r.user == "all" || r.user == user)
                    && r.network.is_none_or(|n| n.contains(&canonical(address)))
            })
            .map(|r| r.method)
    }

    pub fn method_name_for(&self, database: &str, user: &str, address: IpAddr) -> &'static str {
        self.method_for(database, user, address)
            .map_or("none", method_name)
    }

    /// A user's secret from `[users]`, then the auth file, then
    /// `auth_query`.
    async fn secret_for(
        &self,
        proxy: &crate::listener::Proxy,
        database: &str,
        user: &str,
    ) -> Result<Option<Secret>, LoginError> {
        if let Some(secret) = self
            .configured
            .get(user)
            .or_else(|| self.from_file.get(user))
        {
            return Ok(Some(secret.clone()));
        }
        if self.config.auth_query.is_empty() {
            return Ok(None);
        }
        let ttl = self.config.auth_query_cache;
        if let Some((at, secret)) = self
            .queried
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
        {
            if at.elapsed() < ttl {
                return Ok(secret.clone());
            }
        }
        let secret = self.run_auth_query(proxy, database, user).await?;
        let mut cache = self.queried.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > 10_000 {
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        cache.insert(user.to_owned(), (Instant::now(), secret.clone()));
        Ok(secret)
    }

    /// Asks Postgres for a user's secret, as `auth_user`, over that user's
    /// own pool.
    async fn run_auth_query(
        &self,
        proxy: &crate::listener::Proxy,
        database: &str,
        user: &str,
    ) -> Result<Option<Secret>, LoginError> {
        let unavailable = |e: String| {
            tracing::warn!(error = %e, "auth_query failed");
            LoginError::Refused {
                code: "08P01",
                message: "pgstash: cannot look up the user's password (auth_query failed)".into(),
            }
        };
        let config = proxy.config();
        let auth_database = if self.config.auth_dbname.is_empty() {
            database
        } else {
            &self.config.auth_dbname
        };
        let target = config
            .target(auth_database, &self.config.auth_user)
            .ok_or_else(|| unavailable(format!("database {auth_database:?} is not served")))?;
        let pool = proxy.pool_for(&config, &target, auth_database);
        let mut server = pool
            .acquire()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let result = server
            .run_internal_with(&self.config.auth_query, &[user])
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if let Some((code, message)) = result.error {
            return Err(unavailable(format!("{code}: {message}")));
        }
        Ok(result
            .rows
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().nth(1).flatten())
            .map(|text: String| Secret::parse(&text)))
    }

    fn salted_password(&self, user: &str, password: &str, salt: &[u8]) -> Vec<u8> {
        let key = (user.to_owned(), password.to_owned());
        if let Some(salted) = self
            .salted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return salted.clone();
        }
        let salted = gen_salted_password(password, salt, self.config.scram_iterations as usize);
        let mut cache = self.salted.lock().unwrap_or_else(|e| e.into_inner());
        // Only users with plain passwords configured land here; the bound
        // guards against an auth_query returning plain passwords for many.
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(key, salted.clone());
        salted
    }

    /// The salt a user without a stored one is always offered.
    fn salt_for(&self, user: &str) -> Vec<u8> {
        scram::hmac_sha256(&self.salt_key[..], user.as_bytes())[..16].to_vec()
    }
}

/// IPv4 clients reached over an IPv6 socket match IPv4 rules.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// The method's name as configuration spells it.
pub fn method_name(method: AuthMethod) -> &'static str {
    match method {
        AuthMethod::Trust => "trust",
        AuthMethod::Reject => "reject",
        AuthMethod::Password => "password",
        AuthMethod::Md5 => "md5",
        AuthMethod::ScramSha256 => "scram-sha-256",
    }
}

/// The answer to an MD5 challenge from a stored `md5…` hash.
pub fn md5_response(stored: &str, salt: &[u8]) -> String {
    let mut input = stored.trim_start_matches("md5").as_bytes().to_vec();
    input.extend_from_slice(salt);
    format!("md5{:x}", md5::compute(input))
}

/// Compares secrets in time that does not depend on where they differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// What one login attempt knows about its client.
pub struct LoginRequest<'a> {
    pub proxy: &'a crate::listener::Proxy,
    pub authenticator: &'a Authenticator,
    pub database: &'a str,
    pub user: &'a str,
    pub address: IpAddr,
    pub tls: bool,
}

/// Runs the authentication exchange and, on failure, answers after the
/// configured delay. Writes nothing on success: the caller sends
/// AuthenticationOk with the rest of the startup answer.
pub async fn authenticate(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    request: &LoginRequest<'_>,
) -> Result<LoginOk, LoginError> {
    let auth = request.authenticator;
    let user = request.user;
    let host = request.address;
    let Some(method) = auth.method_for(request.database, user, host) else {
        return Err(LoginError::Refused {
            code: "28000",
            message: format!(
                "no pgstash auth rule for host \"{host}\", user \"{user}\", database \"{}\"",
                request.database
            ),
        });
    };
    match method {
        AuthMethod::Trust => {
            return Ok(LoginOk {
                method,
                upstream: None,
            })
        }
        AuthMethod::Reject => {
            return Err(LoginError::Refused {
                code: "28000",
                message: format!(
                    "pgstash auth rules reject connection for host \"{host}\", user \"{user}\", database \"{}\"",
                    request.database
                ),
            })
        }
        _ => {}
    }
    let secret = auth
        .secret_for(request.proxy, request.database, user)
        .await?;
    let exchange = Exchange {
        stream,
        buf,
        user,
        authenticator: auth,
    };
    let outcome = match (method, &secret) {
        (AuthMethod::Password, _) => exchange.cleartext(secret.as_ref()).await,
        // As in Postgres: md5 with a SCRAM verifier means SCRAM.
        (AuthMethod::Md5, Some(Secret::Scram(_))) => {
            exchange.scram(secret.as_ref(), request.tls).await
        }
        (AuthMethod::Md5, _) => exchange.md5(secret.as_ref()).await,
        _ => exchange.scram(secret.as_ref(), request.tls).await,
    };
    match outcome {
        Ok(upstream) => {
            auth.failures.succeeded(host);
            Ok(LoginOk { method, upstream })
        }
        Err(ExchangeError::Io(e)) => Err(LoginError::Io(e)),
        Err(failure) => {
            // Known and unknown users wait alike; an address that keeps
            // failing waits longer each time.
            let delay = auth.failures.failed(
                host,
                auth.config.failure_delay,
                auth.config.failure_delay_max,
            );
            tracing::info!(user, %host, reason = %failure, "authentication failed");
            tokio::time::sleep(delay).await;
            Err(match failure {
                ExchangeError::Malformed(message) => LoginError::Refused {
                    code: "08P01",
                    message,
                },
                _ => LoginError::Refused {
                    code: "28P01",
                    message: format!("password authentication failed for user \"{user}\""),
                },
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("wrong password or unknown user")]
    WrongPassword,
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for ExchangeError {
    fn from(e: std::io::Error) -> Self {
        ExchangeError::Io(e)
    }
}

impl From<PgWireError> for ExchangeError {
    fn from(e: PgWireError) -> Self {
        match e {
            PgWireError::InvalidPassword(_) => ExchangeError::WrongPassword,
            PgWireError::IoError(e) => ExchangeError::Io(e),
            other => ExchangeError::Malformed(format!("invalid SASL message: {other}")),
        }
    }
}

/// One client's password exchange.
struct Exchange<'a> {
    stream: &'a mut ClientStream,
    buf: &'a mut BytesMut,
    user: &'a str,
    authenticator: &'a Authenticator,
}

impl Exchange<'_> {
    async fn send(&mut self, message: Authentication) -> Result<(), ExchangeError> {
        let mut out = BytesMut::new();
        message.encode(&mut out)?;
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads the client's next message, which must be a password-family
    /// one ('p').
    async fn receive(&mut self) -> Result<Bytes, ExchangeError> {
        loop {
            match split_frame(self.buf, MAX_AUTH_MESSAGE) {
                Ok(Some(mut frame)) if frame.tag == b'p' => {
                    return Ok(frame
                        .raw
                        .split_off(crate::protocol::frame::HEADER_LEN)
                        .freeze());
                }
                Ok(Some(frame)) => {
                    return Err(ExchangeError::Malformed(format!(
                        "expected password response, got message type {:?}",
                        frame.tag as char
                    )))
                }
                Ok(None) => {}
                Err(e) => return Err(ExchangeError::Malformed(e.to_string())),
            }
            if self.stream.read_some(self.buf).await? == 0 {
                return Err(ExchangeError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    async fn password(&mut self) -> Result<String, ExchangeError> {
        let body = self.receive().await?;
        let text = body
            .strip_suffix(b"\0")
            .filter(|t| !t.contains(&0))
            .ok_or_else(|| ExchangeError::Malformed("password message is not a string".into()))?;
        String::from_utf8(text.to_vec())
            .map_err(|_| ExchangeError::Malformed("password is not UTF-8".into()))
    }

    /// SASLInitialResponse: mechanism name, then length-prefixed data.
    /// Checked here rather than by a decoder that trusts the lengths.
    async fn sasl_initial(&mut self) -> Result<(String, Bytes), ExchangeError> {
        let body = self.receive().await?;
        let malformed = || ExchangeError::Malformed("malformed SASLInitialResponse".into());
        let mut rest = &body[..];
        let mechanism = crate::protocol::frame::get_cstr(&mut rest).ok_or_else(malformed)?;
        let mechanism = String::from_utf8(mechanism.to_vec()).map_err(|_| malformed())?;
        let length = crate::protocol::frame::get_i32(&mut rest).ok_or_else(malformed)?;
        if length < 0 || length as usize != rest.len() {
            return Err(malformed());
        }
        Ok((mechanism, Bytes::copy_from_slice(rest)))
    }

    async fn cleartext(
        mut self,
        secret: Option<&Secret>,
    ) -> Result<Option<UpstreamSecret>, ExchangeError> {
        self.send(Authentication::CleartextPassword).await?;
        let password = self.password().await?;
        let matches = match secret {
            Some(Secret::Plain(expected)) => same(password.as_bytes(), expected.as_bytes()),
            Some(Secret::Md5(stored)) => {
                let hashed = format!("md5{:x}", md5::compute(format!("{password}{}", self.user)));
                same(hashed.as_bytes(), stored.as_bytes())
            }
            Some(Secret::Scram(v)) => {
                let salted = gen_salted_password(&password, &v.salt, v.iterations as usize);
                same(&scram::stored_key(&salted), &v.stored_key)
            }
            None => false,
        };
        if matches {
            Ok(Some(UpstreamSecret::Password(password)))
        } else {
            Err(ExchangeError::WrongPassword)
        }
    }

    async fn md5(
        mut self,
        secret: Option<&Secret>,
    ) -> Result<Option<UpstreamSecret>, ExchangeError> {
        let salt: [u8; 4] = rand::random();
        self.send(Authentication::MD5Password(salt.to_vec()))
            .await?;
        let answer = self.password().await?;
        let (expected, upstream) = match secret {
            Some(Secret::Plain(password)) => (
                pgwire::api::auth::md5pass::hash_md5_password(self.user, password, &salt),
                UpstreamSecret::Password(password.clone()),
            ),
            Some(Secret::Md5(stored)) => (
                md5_response(stored, &salt),
                UpstreamSecret::Md5Hash(stored.clone()),
            ),
            // Unknown users are refused only after their answer, like
            // known users with a wrong password.
            _ => return Err(ExchangeError::WrongPassword),
        };
        if same(answer.as_bytes(), expected.as_bytes()) {
            Ok(Some(upstream))
        } else {
            Err(ExchangeError::WrongPassword)
        }
    }

    async fn scram(
        mut self,
        secret: Option<&Secret>,
        tls: bool,
    ) -> Result<Option<UpstreamSecret>, ExchangeError> {
        let auth = self.authenticator;
        let server = match (&auth.scram_tls, tls) {
            (Some(bound), true) => bound,
            _ => &auth.scram_plain,
        };
        let mut mechanisms = vec![SCRAM_SHA_256.to_owned()];
        if server.supports_channel_binding() {
            mechanisms.push(SCRAM_SHA_256_PLUS.to_owned());
        }
        self.send(Authentication::SASL(mechanisms.clone())).await?;
        let (mechanism, client_first) = self.sasl_initial().await?;
        if !mechanisms.contains(&mechanism) {
            return Err(ExchangeError::Malformed(format!(
                "SASL mechanism {mechanism:?} was not offered"
            )));
        }
        let iterations = auth.config.scram_iterations as usize;
        let (scram_secret, verifier) = match secret {
            Some(Secret::Scram(v)) => (
                ScramSecret::Verifier {
                    salt: v.salt.clone(),
                    iterations: v.iterations as usize,
                    stored_key: v.stored_key.clone(),
                    server_key: v.server_key.clone(),
                },
                Some(v),
            ),
            Some(Secret::Plain(password)) => {
                let salt = auth.salt_for(self.user);
                let salted_password = auth.salted_password(self.user, password, &salt);
                (
                    ScramSecret::SaltedPassword {
                        salt,
                        salted_password,
                    },
                    None,
                )
            }
            // Unknown user, or only an MD5 hash: the exchange runs to the
            // end with keys nobody holds, so it looks like a wrong password.
            _ => (
                ScramSecret::Verifier {
                    salt: auth.salt_for(self.user),
                    iterations,
                    stored_key: rand::random::<[u8; 32]>().to_vec(),
                    server_key: rand::random::<[u8; 32]>().to_vec(),
                },
                None,
            ),
        };
        let (server_first, waiting) =
            server.on_client_first_message_with_secret(&client_first, scram_secret)?;
        self.send(Authentication::SASLContinue(server_first.clone().into()))
            .await?;
        let client_final = self.receive().await?;
        let server_final = waiting.on_client_final_message(&client_final)?;
        self.send(Authentication::SASLFinal(server_final.into()))
            .await?;
        let upstream = match (secret, verifier) {
            (Some(Secret::Plain(password)), _) => Some(UpstreamSecret::Password(password.clone())),
            (_, Some(v)) => scram::recover_client_key(
                &v.stored_key,
                &client_first,
                &server_first,
                &client_final,
            )
            .map(|client_key| {
                UpstreamSecret::ScramKeys(scram::ScramKeys {
                    client_key,
                    server_key: v.server_key.clone(),
                })
            }),
            _ => None,
        };
        Ok(upstream)
    }
}
