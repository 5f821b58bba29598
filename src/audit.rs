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
