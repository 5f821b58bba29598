//! A client's session settings, and making a server connection match them.
//!
//! The client's startup parameters are its defaults (RESET brings them
//! back, as it would on a direct connection). Settings the client changes
//! are read back from the server after the batch that changed them, so the
//! value replayed on the next server is exactly what Postgres holds.

use std::collections::{BTreeMap, BTreeSet};

use crate::upstream::{ServerConn, UpstreamError};

/// Startup parameters that are not settings.
const NOT_SETTINGS: [&str; 4] = ["user", "database", "options", "replication"];

/// Reported parameters that cannot be set, so must never be replayed.
const READ_ONLY: [&str; 6] = [
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "in_hot_standby",
    "session_authorization",
];

#[derive(Debug, Default)]
pub struct ClientSettings {
    /// Values from the StartupMessage (including `options=-c ...`).
    pub startup: BTreeMap<String, String>,
    /// What the client's session holds now.
    pub current: BTreeMap<String, String>,
    /// Bumped on every change, so an unchanged client can skip the compare.
    pub version: u64,
    /// Settings changed by statements whose values must be read back.
    pub dirty: BTreeSet<String>,
}

impl ClientSettings {
    pub fn from_startup(params: &BTreeMap<String, String>) -> ClientSettings {
        let mut startup = BTreeMap::new();
        for (name, value) in params {
            let name = name.to_ascii_lowercase();
            if NOT_SETTINGS.contains(&name.as_str()) || name.starts_with("_pq_.") {
                continue;
            }
            startup.insert(name, value.clone());
        }
        if let Some(options) = params.get("options") {
            for (name, value) in parse_options(options) {
                startup.insert(name, value);
            }
        }
        ClientSettings {
            current: startup.clone(),
            startup,
            version: 1,
            dirty: BTreeSet::new(),
        }
    }

    pub fn is_tracked(name: &str) -> bool {
        !READ_ONLY.contains(&name) && is_plain_name(name)
    }

    /// Records a value Postgres reported for the client's own session.
    pub fn reported(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        if !Self::is_tracked(&name) {
            return;
        }
        if self.current.get(&name).map(String::as_str) != Some(value) {
            self.current.insert(name, value.to_owned());
            self.version += 1;
        }
    }

    /// RESET: back to the startup value, or to the server's default.
    pub fn reset(&mut self, name: &str) {
        match self.startup.get(name) {
            Some(v) => {
                self.current.insert(name.to_owned(), v.clone());
            }
            None => {
                self.current.remove(name);
            }
        }
        self.version += 1;
    }

    pub fn reset_all(&mut self) {
        self.current = self.startup.clone();
        self.version += 1;
    }
}

/// `options=-c a=b --c=d` as libpq passes PGOPTIONS.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut words = options.split_whitespace();
    while let Some(word) = words.next() {
        let assignment = if word == "-c" {
            words.next()
        } else if let Some(rest) = word.strip_prefix("--") {
            Some(rest)
        } else {
            word.strip_prefix("-c")
        };
        if let Some((name, value)) = assignment.and_then(|a| a.split_once('=')) {
            out.push((
                name.to_ascii_lowercase().replace('-', "_"),
                value.to_owned(),
            ));
        }
    }
    out
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Reads back the values of settings the client's statements touched.
pub async fn read_back(
    server: &mut ServerConn,
    client: &mut ClientSettings,
) -> Result<(), UpstreamError> {
    let names: Vec<String> = std::mem::take(&mut client.dirty)
        .into_iter()
        .filter(|n| ClientSettings::is_tracked(n))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let columns: Vec<String> = names
        .iter()
        .map(|n| format!("current_setting({}, true)", quote_literal(n)))
        .collect();
    let result = server
        .run_internal(&format!("SELECT {}", columns.join(", ")))
        .await?;
    let Some(row) = result.rows.first() else {
        return Ok(());
    };
    for (name, value) in names.iter().zip(row) {
        match value {
            Some(v) => {
                server.settings.insert(name.clone(), v.clone());
                if client.current.get(name) != Some(v) {
                    client.current.insert(name.clone(), v.clone());
                    client.version += 1;
                }
            }
            None => {
                server.settings.remove(name);
                if client.current.remove(name).is_some() {
                    client.version += 1;
                }
            }
        }
    }
    Ok(())
}

/// Makes the server's settings equal the client's. Returns the values
/// Postgres reported while doing so, and an error Postgres raised (a bad
/// startup parameter, say) as `(sqlstate, message)`.
pub async fn apply(
    server: &mut ServerConn,
    client_id: u64,
    client: &mut ClientSettings,
) -> Result<Option<(String, String)>, UpstreamError> {
    if server.applied_for == Some((client_id, client.version)) {
        return Ok(None);
    }
    let mut statements = Vec::new();
    for name in server.settings.keys() {
        if !client.current.contains_key(name) {
            statements.push(format!("RESET {name}"));
        }
    }
    let mut assignments = Vec::new();
    for (name, value) in &client.current {
        if server.settings.get(name) != Some(value) {
            assignments.push(format!(
                "set_config({}, {}, false)",
                quote_literal(name),
                quote_literal(value)
            ));
        }
    }
    if !assignments.is_empty() {
        statements.push(format!("SELECT {}", assignments.join(", ")));
    }
    if !statements.is_empty() {
        let result = server.run_internal(&statements.join("; ")).await?;
        if let Some(error) = result.error {
            // The server holds an unknown mix of old and new values.
            server.broken = true;
            return Ok(Some(error));
        }
        server.settings = client.current.clone();
        for (name, value) in result.parameter_status {
            client.reported(&name, &value);
            let name = name.to_ascii_lowercase();
            if ClientSettings::is_tracked(&name) {
                server.settings.insert(name, value);
            }
        }
    }
    server.applied_for = Some((client_id, client.version));
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_parameters_become_defaults() {
        let params: BTreeMap<String, String> = [
            ("user", "bob"),
            ("database", "db"),
            ("application_name", "app"),
            ("options", "-c search_path=s1 --statement-timeout=5s"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let mut s = ClientSettings::from_startup(&params);
        assert_eq!(s.current["application_name"], "app");
        assert_eq!(s.current["search_path"], "s1");
        assert_eq!(s.current["statement_timeout"], "5s");
        assert!(!s.current.contains_key("user"));
        s.reported("application_name", "other");
        s.reset("application_name");
        assert_eq!(s.current["application_name"], "app");
    }
}
