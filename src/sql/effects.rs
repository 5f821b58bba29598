//! Session effects of a statement: the settings it changes, resets it
//! performs, and the features that tie a client to one server connection.
//!
//! Transaction pooling hands a client a different server for each
//! transaction, so whatever a statement leaves behind in the server's
//! session must be noticed here. A cheap scan of statement-leading keywords
//! rules out almost every statement; only the rest are tokenized (with
//! sqlparser's tokenizer, so quoting and comments are handled properly).

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer, Word};

/// Why a client must keep its server connection.
pub type PinReason = &'static str;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionEffects {
    /// Settings (lowercase names) the statement may change for the session.
    pub set: Vec<String>,
    /// Settings put back to their defaults.
    pub reset: Vec<String>,
    pub reset_all: bool,
    pub discard_all: bool,
    /// Session state that cannot move between server connections.
    pub pin: Option<PinReason>,
    /// `DEALLOCATE name` (`None` inside means ALL) when it is the only
    /// statement: protocol-level statement names are pgstash's to manage.
    pub deallocate: Option<Option<String>>,
}

impl SessionEffects {
    pub fn is_empty(&self) -> bool {
        *self == SessionEffects::default()
    }
}

const LEADING_KEYWORDS: [&str; 8] = [
    "set",
    "reset",
    "discard",
    "listen",
    "prepare",
    "declare",
    "create",
    "deallocate",
];

/// Returns the effects of `sql`, one or many statements.
pub fn session_effects(sql: &str) -> SessionEffects {
    if !may_have_effects(sql) {
        return SessionEffects::default();
    }
    let dialect = PostgreSqlDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize() else {
        // Postgres will refuse what cannot be tokenized; nothing to track.
        return SessionEffects::default();
    };
    let mut effects = SessionEffects::default();
    let statements: Vec<Vec<Token>> = tokens
        .split(|t| *t == Token::SemiColon)
        .map(|s| {
            s.iter()
                .filter(|t| !matches!(t, Token::Whitespace(_)))
                .cloned()
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .collect();
    let single = statements.len() == 1;
    for statement in &statements {
        statement_effects(statement, single, &mut effects);
    }
    effects
}

fn may_have_effects(sql: &str) -> bool {
    let bytes = sql.as_bytes();
    if contains_ignore_case(bytes, b"advisory") || contains_ignore_case(bytes, b"set_config") {
        return true;
    }
    let mut at_statement_start = true;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if at_statement_start {
            if b.is_ascii_whitespace() || b == b'(' {
                i += 1;
                continue;
            }
            if bytes[i..].starts_with(b"--") {
                i = bytes[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(bytes.len(), |p| i + p);
                continue;
            }
            if bytes[i..].starts_with(b"/*") {
                i = find(&bytes[i + 2..], b"*/").map_or(bytes.len(), |p| i + 2 + p + 2);
                continue;
            }
            let end = bytes[i..]
                .iter()
                .position(|c| !c.is_ascii_alphabetic())
                .map_or(bytes.len(), |p| i + p);
            let word = &bytes[i..end];
            if LEADING_KEYWORDS
                .iter()
                .any(|k| word.eq_ignore_ascii_case(k.as_bytes()))
            {
                return true;
            }
            at_statement_start = false;
            i = end.max(i + 1);
            continue;
        }
        if b == b';' {
            at_statement_start = true;
        }
        i += 1;
    }
    false
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

fn word(token: Option<&Token>) -> Option<&Word> {
    match token {
        Some(Token::Word(w)) => Some(w),
        _ => None,
    }
}

/// Whether the token is the unquoted keyword `kw` (case-insensitive).
fn is_kw(token: Option<&Token>, kw: &str) -> bool {
    word(token).is_some_and(|w| w.quote_style.is_none() && w.value.eq_ignore_ascii_case(kw))
}

/// A setting name starting at `tokens[i]`: `name` or `prefix.name`.
fn setting_name(tokens: &[Token], i: usize) -> Option<String> {
    let first = word(tokens.get(i))?;
    let mut name = normalise(first);
    if tokens.get(i + 1) == Some(&Token::Period) {
        let second = word(tokens.get(i + 2))?;
        name.push('.');
        name.push_str(&normalise(second));
    }
    Some(name)
}

fn normalise(w: &Word) -> String {
    if w.quote_style.is_some() {
        w.value.clone()
    } else {
        w.value.to_ascii_lowercase()
    }
}

fn statement_effects(t: &[Token], single: bool, effects: &mut SessionEffects) {
    let first = t.first();
    if is_kw(first, "set") {
        set_effects(t, effects);
    } else if is_kw(first, "reset") {
        if is_kw(t.get(1), "all") {
            effects.reset_all = true;
        } else if is_kw(t.get(1), "session") && is_kw(t.get(2), "authorization") {
            effects
                .reset
                .extend(["session_authorization".into(), "role".into()]);
        } else if is_kw(t.get(1), "time") && is_kw(t.get(2), "zone") {
            effects.reset.push("timezone".into());
        } else if let Some(name) = setting_name(t, 1) {
            effects.reset.push(name);
        }
    } else if is_kw(first, "discard") && is_kw(t.get(1), "all") {
        effects.discard_all = true;
    } else if is_kw(first, "listen") {
        effects.pin = Some("LISTEN");
    } else if is_kw(first, "prepare") && !is_kw(t.get(1), "transaction") {
        effects.pin = Some("SQL PREPARE");
    } else if is_kw(first, "declare") {
        let with_hold = t
            .windows(2)
            .any(|w| is_kw(w.first(), "with") && is_kw(w.get(1), "hold"));
        if with_hold {
            effects.pin = Some("cursor WITH HOLD");
        }
    } else if is_kw(first, "create") {
        let temp = t
            .iter()
            .skip(1)
            .take(3)
            .any(|tok| is_kw(Some(tok), "temp") || is_kw(Some(tok), "temporary"));
        if temp {
            effects.pin = Some("temporary table");
        }
    } else if is_kw(first, "deallocate") && single {
        let i = if is_kw(t.get(1), "prepare") { 2 } else { 1 };
        if is_kw(t.get(i), "all") {
            effects.deallocate = Some(None);
        } else if let Some(w) = word(t.get(i)) {
            effects.deallocate = Some(Some(w.value.clone()));
        }
    }
    for (i, token) in t.iter().enumerate() {
        let Some(w) = word(Some(token)) else { continue };
        let name = w.value.to_ascii_lowercase();
        if name.starts_with("pg_advisory_lock") || name.starts_with("pg_try_advisory_lock") {
            effects.pin = Some("session advisory lock");
        } else if name == "set_config" && t.get(i + 1) == Some(&Token::LParen) {
            if let Some(Token::SingleQuotedString(setting)) = t.get(i + 2) {
                effects.set.push(setting.to_ascii_lowercase());
            }
        }
    }
}

fn set_effects(t: &[Token], effects: &mut SessionEffects) {
    let mut i = 1;
    if is_kw(t.get(1), "local") {
        return; // transaction-scoped: gone by the time the server is released
    }
    if is_kw(t.get(1), "session") {
        if is_kw(t.get(2), "authorization") {
            effects
                .set
                .extend(["session_authorization".into(), "role".into()]);
            return;
        }
        if is_kw(t.get(2), "characteristics") {
            effects.set.extend([
                "default_transaction_isolation".into(),
                "default_transaction_read_only".into(),
                "default_transaction_deferrable".into(),
            ]);
            return;
        }
        i = 2;
    }
    let next = t.get(i);
    if is_kw(next, "transaction") || is_kw(next, "constraints") {
        return;
    }
    let name = if is_kw(next, "time") && is_kw(t.get(i + 1), "zone") {
        "timezone".to_owned()
    } else if is_kw(next, "schema") {
        "search_path".to_owned()
    } else if is_kw(next, "names") {
        "client_encoding".to_owned()
    } else {
        match setting_name(t, i) {
            Some(name) => name,
            None => return,
        }
    };
    effects.set.push(name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_statements_have_no_effects() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 2;",
            "BEGIN",
            "select 'set x = 1'",
        ] {
            assert!(session_effects(sql).is_empty(), "{sql}");
        }
    }

    #[test]
    fn settings_are_named() {
        let e = session_effects("set search_path to a, b; SET SESSION statement_timeout = 5; SET LOCAL work_mem = '1MB'");
        assert_eq!(e.set, vec!["search_path", "statement_timeout"]);
        assert_eq!(session_effects("SET TIME ZONE 'UTC'").set, vec!["timezone"]);
        assert_eq!(
            session_effects("/* c */ set myapp.tenant = '7'").set,
            vec!["myapp.tenant"]
        );
        assert_eq!(
            session_effects("select set_config('app.user', '1', false)").set,
            vec!["app.user"]
        );
        assert_eq!(session_effects("RESET DateStyle").reset, vec!["datestyle"]);
        assert!(session_effects("reset all").reset_all);
        assert!(session_effects("DISCARD ALL").discard_all);
    }

    #[test]
    fn pinning_features_are_found() {
        assert_eq!(session_effects("LISTEN chan").pin, Some("LISTEN"));
        assert_eq!(
            session_effects("create temp table t (a int)").pin,
            Some("temporary table")
        );
        assert_eq!(
            session_effects("select pg_advisory_lock(1)").pin,
            Some("session advisory lock")
        );
        assert_eq!(session_effects("select pg_advisory_xact_lock(1)").pin, None);
        assert_eq!(
            session_effects("PREPARE p AS SELECT 1").pin,
            Some("SQL PREPARE")
        );
        assert_eq!(
            session_effects("declare c cursor with hold for select 1").pin,
            Some("cursor WITH HOLD")
        );
        assert_eq!(session_effects("create table t (a int)").pin, None);
    }

    #[test]
    fn deallocate_is_recognised_alone() {
        assert_eq!(
            session_effects("DEALLOCATE s1").deallocate,
            Some(Some("s1".into()))
        );
        assert_eq!(
            session_effects("deallocate prepare all").deallocate,
            Some(None)
        );
        assert_eq!(session_effects("deallocate a; select 1").deallocate, None);
    }
}
