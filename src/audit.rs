//! The audit log: one JSON object per line for every login (accepted or
//! refused) and every DDL, role or privilege statement. Statements are
//! recorded by their literal-free fingerprint, never with their values.

use std::io::Write;
use std::sync::Mutex;

use serde::Serialize;

/// Where audit lines go; `None` inside when the log is off.
pub struct AuditLog {
    sink: Option<Mutex<Box<dyn Write + Send>>>,
    destination: String,
}

/// One audited event.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent<'a> {
    Login {
        outcome: &'a str,
        method: &'a str,
        /// Why a login was refused (no secrets, no password text).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        tls: bool,
    },
    Statement {
        kind: &'a str,
        fingerprint: &'a str,
    },
}

/// Who an event concerns.
#[derive(Debug, Serialize)]
pub struct AuditSubject<'a> {
    pub client_addr: &'a str,
    pub user: &'a str,
    pub database: &'a str,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    subject: &'a AuditSubject<'a>,
    #[serde(flatten)]
    event: &'a AuditEvent<'a>,
}

impl AuditLog {
    pub fn off() -> AuditLog {
        AuditLog {
            sink: None,
            destination: String::new(),
        }
    }

    /// Opens the destination: "" (off), "stdout", or a file appended to.
    pub fn open(destination: &str) -> std::io::Result<AuditLog> {
        let sink: Box<dyn Write + Send> = match destination {
            "" => return Ok(AuditLog::off()),
            "stdout" => Box::new(std::io::stdout()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        Ok(AuditLog {
            sink: Some(Mutex::new(sink)),
            destination: destination.to_owned(),
        })
    }

    pub fn destination(&self) -> &str {
        &self.destination
    }

    pub fn enabled(&self) -> bool {
        self.sink.is_some()
    }

    pub fn record(&self, subject: &AuditSubject<'_>, event: &AuditEvent<'_>) {
        let Some(sink) = &self.sink else { return };
        let line = Line {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            subject,
            event,
        };
        let Ok(mut text) = serde_json::to_vec(&line) else {
            return;
        };
        text.push(b'\n');
        let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
        // One write per line, so concurrent writers never interleave.
        if let Err(e) = sink.write_all(&text).and_then(|()| sink.flush()) {
            tracing::warn!(error = %e, "cannot write the audit log");
        }
    }
}

/// Whether a statement is audited, and as what: "privilege" (GRANT,
/// REVOKE, REASSIGN), "role" (CREATE/ALTER/DROP ROLE, SET ROLE, SET
/// SESSION AUTHORIZATION) or "ddl" (any other CREATE, ALTER, DROP,
/// COMMENT, SECURITY LABEL). A string of several statements is audited if
/// any of them is, as the first such.
pub fn statement_kind(sql: &str) -> Option<&'static str> {
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;
    // Every audited statement names one of these words; the rest of the
    // traffic (reads, writes) is not parsed a second time.
    if !AUDITED_WORDS.iter().any(|word| contains_word(sql, word)) {
        return None;
    }
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        // The parser's rendering starts with the statement's keywords,
        // whatever comments or case the client used.
        Ok(statements) => statements
            .iter()
            .find_map(|statement| kind_by_keywords(&statement.to_string())),
        Err(_) => kind_by_keywords(sql),
    }
}

const AUDITED_WORDS: [&str; 10] = [
    "CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "REASSIGN", "COMMENT", "SECURITY", "ROLE",
    "SESSION",
];

fn contains_word(sql: &str, word: &str) -> bool {
    sql.as_bytes()
        .windows(word.len())
        .any(|window| window.eq_ignore_ascii_case(word.as_bytes()))
}

fn kind_by_keywords(sql: &str) -> Option<&'static str> {
    let mut words = sql
        .split_whitespace()
        .map(|w| w.trim_end_matches(';').to_ascii_uppercase());
    let first = words.next()?;
    let second = words.next().unwrap_or_default();
    match (first.as_str(), second.as_str()) {
        ("GRANT" | "REVOKE" | "REASSIGN", _) => Some("privilege"),
        ("CREATE" | "ALTER" | "DROP", "ROLE" | "USER" | "GROUP") => Some("role"),
        ("SET" | "RESET", "ROLE" | "SESSION") => Some("role"),
        ("CREATE" | "ALTER" | "DROP" | "COMMENT", _) | ("SECURITY", "LABEL") => Some("ddl"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::statement_kind;

    #[test]
    fn classifies_audited_statements() {
        assert_eq!(
            statement_kind("grant select on t to bob"),
            Some("privilege")
        );
        assert_eq!(
            statement_kind("CREATE ROLE x LOGIN PASSWORD 'p'"),
            Some("role")
        );
        assert_eq!(statement_kind("set role admin"), Some("role"));
        assert_eq!(statement_kind("CREATE TABLE t (a int)"), Some("ddl"));
        assert_eq!(
            statement_kind("/* x */ select 1; create temp table t (a text default 'v')"),
            Some("ddl")
        );
        assert_eq!(statement_kind("create index on t (a)"), Some("ddl"));
        assert_eq!(statement_kind("SELECT 1"), None);
        assert_eq!(statement_kind("INSERT INTO t VALUES (1)"), None);
    }
}
