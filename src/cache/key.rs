//! Cache keys: everything that changes the bytes of an answer, hashed with
//! a stable 128-bit hash (xxh3) so keys mean the same in every process.

use std::collections::BTreeMap;

use xxhash_rust::xxh3::Xxh3;

/// Settings that cannot change a result's bytes; everything else a session
/// holds (output formats, custom settings, role, search_path) is keyed.
const NOT_IN_KEY: [&str; 7] = [
    "application_name",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "work_mem",
    "client_min_messages",
];

/// Which protocol a result is for: their stored bytes differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Simple = 1,
    Extended = 2,
}

/// The part of a key that belongs to the session: database, login user and
/// every keyed setting. Computed once per settings change.
pub fn session_context(
    database_oid: u32,
    login_user: &str,
    search_path: &str,
    settings: &BTreeMap<String, String>,
) -> u128 {
    let mut h = Xxh3::new();
    h.update(&database_oid.to_be_bytes());
    field(&mut h, login_user.as_bytes());
    field(&mut h, search_path.as_bytes());
    for (name, value) in settings {
        if NOT_IN_KEY.contains(&name.as_str()) || name == "search_path" {
            continue;
        }
        field(&mut h, name.as_bytes());
        field(&mut h, value.as_bytes());
    }
    h.digest128()
}

/// The key of one statement execution. `bind` is the tail of a Bind
/// message: parameter formats, values and result formats.
pub fn statement_key(
    context: u128,
    protocol: Protocol,
    text: &[u8],
    param_types: &[u32],
    bind: &[u8],
) -> u128 {
    let mut h = Xxh3::new();
    h.update(&context.to_be_bytes());
    h.update(&[protocol as u8]);
    field(&mut h, text);
    h.update(&(param_types.len() as u32).to_be_bytes());
    for oid in param_types {
        h.update(&oid.to_be_bytes());
    }
    field(&mut h, bind);
    h.digest128()
}

/// Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
fn field(h: &mut Xxh3, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_keyed_changes_the_key() {
        let mut settings = BTreeMap::new();
        settings.insert("timezone".to_string(), "UTC".to_string());
        let base = session_context(1, "app", "public", &settings);
        assert_ne!(base, session_context(2, "app", "public", &settings));
        assert_ne!(base, session_context(1, "other", "public", &settings));
        assert_ne!(base, session_context(1, "app", "s2, public", &settings));
        let mut tz = settings.clone();
        tz.insert("timezone".into(), "Europe/Paris".into());
        assert_ne!(base, session_context(1, "app", "public", &tz));
        let mut app = settings.clone();
        app.insert("application_name".into(), "x".into());
        assert_eq!(base, session_context(1, "app", "public", &app));

        let k = statement_key(base, Protocol::Simple, b"select 1", &[], b"");
        assert_ne!(
            k,
            statement_key(base, Protocol::Extended, b"select 1", &[], b"")
        );
        assert_ne!(
            k,
            statement_key(base, Protocol::Simple, b"select 2", &[], b"")
        );
        assert_ne!(
            statement_key(
                base,
                Protocol::Extended,
                b"select $1",
                &[23],
                b"\0\0\0\x01\0\0\0\x011"
            ),
            statement_key(
                base,
                Protocol::Extended,
                b"select $1",
                &[23],
                b"\0\0\0\x01\0\0\0\x012"
            )
        );
    }
}
