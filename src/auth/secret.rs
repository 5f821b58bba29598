//! A user's secret as pgstash holds it (a password, an MD5 hash or a SCRAM
//! verifier, in Postgres' own notations), and PgBouncer's `userlist.txt`.

use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// What a user's password is known as.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Plain(String),
    /// `md5` followed by hex(md5(password || user)).
    Md5(String),
    Scram(ScramVerifier),
}

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never rendered: logs and panics must not carry secrets.
        f.write_str(match self {
            Secret::Plain(_) => "Plain(..)",
            Secret::Md5(_) => "Md5(..)",
            Secret::Scram(_) => "Scram(..)",
        })
    }
}

impl Secret {
    /// Reads a secret in the notation Postgres stores (`pg_authid.rolpassword`)
    /// and PgBouncer's auth file uses.
    pub fn parse(text: &str) -> Secret {
        if let Some(verifier) = ScramVerifier::parse(text) {
            return Secret::Scram(verifier);
        }
        let is_md5 = text.len() == 35
            && text.starts_with("md5")
            && text[3..].bytes().all(|b| b.is_ascii_hexdigit());
        if is_md5 {
            Secret::Md5(text.to_ascii_lowercase())
        } else {
            Secret::Plain(text.to_owned())
        }
    }
}

impl ScramVerifier {
    pub fn parse(text: &str) -> Option<ScramVerifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (iterations_and_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iterations_and_salt.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;
        let verifier = ScramVerifier {
            iterations: iterations.parse().ok().filter(|&i| i > 0)?,
            salt: STANDARD.decode(salt).ok()?,
            stored_key: STANDARD.decode(stored_key).ok()?,
            server_key: STANDARD.decode(server_key).ok()?,
        };
        (verifier.stored_key.len() == 32 && verifier.server_key.len() == 32).then_some(verifier)
    }
}

/// Parses PgBouncer's auth file: one `"user" "secret"` per line, `""`
/// inside quotes for a literal quote; lines that do not start with a quote
/// are comments.
pub fn parse_userlist(text: &str) -> Result<HashMap<String, Secret>, String> {
    let mut users = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if !line.starts_with('"') {
            continue;
        }
        let mut rest = line;
        let mut fields = Vec::with_capacity(2);
        while fields.len() < 2 {
            rest = rest.trim_start();
            let Some((field, after)) = quoted(rest) else {
                return Err(format!("line {}: expected \"user\" \"secret\"", number + 1));
            };
            fields.push(field);
            rest = after;
        }
        let secret = fields.pop().unwrap_or_default();
        let user = fields.pop().unwrap_or_default();
        users.insert(user, Secret::parse(&secret));
    }
    Ok(users)
}

/// One double-quoted field and what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut chars = text.strip_prefix('"')?.char_indices().peekable();
    let body = &text[1..];
    let mut field = String::new();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if matches!(chars.peek(), Some((_, '"'))) {
                chars.next();
                field.push('"');
            } else {
                return Some((field, &body[i + 1..]));
            }
        } else {
            field.push(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_notations() {
        let verifier = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$\
            WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:\
            vK6gd3xyJUqWgfLJ5Bf3KKYd+y7BrOiM6JAqU8bN1Uw=";
        assert!(matches!(Secret::parse(verifier), Secret::Scram(v) if v.iterations == 4096));
        assert!(matches!(
            Secret::parse("md5 0123456789abcdef0123456789abcdef"),
            Secret::Plain(_)
        ));
        assert!(matches!(
            Secret::parse("md50123456789ABCDEF0123456789abcdef"),
            Secret::Md5(h) if h == "md50123456789abcdef0123456789abcdef"
        ));
        assert!(matches!(Secret::parse("SCRAM-SHA-256$x"), Secret::Plain(_)));
    }

    #[test]
    fn reads_pgbouncer_userlist() {
        let text = "; comment\n\"alice\" \"secret\"\n  \"bo\"\"b\" \"md50123456789abcdef0123456789abcdef\" trailing\n\n";
        let users = parse_userlist(text).unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users["alice"], Secret::Plain("secret".into()));
        assert!(matches!(users["bo\"b"], Secret::Md5(_)));
        assert!(parse_userlist("\"alice\" secret\n").is_err());
    }
}
