//! A statement's shape without its numbers: what the analysis of a
//! statement is cached under.
//!
//! In the simple protocol every query text carries its own literals, so an
//! analysis cached by exact text would never be reused. Numbers never
//! change which tables or functions a statement uses, so they are replaced;
//! everything else, string literals and comments (hints) included, stays.
//! Quoted strings, quoted identifiers and comments are skipped over so that
//! a digit inside them is left alone; anything unusual (dollar quotes,
//! escape strings) keeps the exact text, which is always correct.

use xxhash_rust::xxh3::Xxh3;

/// Hashes `sql` with numeric literals folded.
pub fn fingerprint(sql: &str) -> u128 {
    let bytes = sql.as_bytes();
    let mut hasher = Xxh3::new();
    if bytes.contains(&b'$') || has_escape_string(bytes) {
        // Dollar quotes (and $n parameters, harmlessly) or E'' strings: the
        // exact text, no folding.
        hasher.update(b"exact\0");
        hasher.update(bytes);
        return hasher.digest128();
    }
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\'' | b'"' => i = skip_quoted(bytes, i, b),
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = bytes[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(bytes.len(), |p| i + p);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = bytes[i + 2..]
                    .windows(2)
                    .position(|w| w == b"*/")
                    .map_or(bytes.len(), |p| i + 2 + p + 2);
            }
            b'0'..=b'9' if i == 0 || !is_identifier_byte(bytes[i - 1]) => {
                let end = number_end(bytes, i);
                hasher.update(&bytes[start..i]);
                hasher.update(b"?");
                start = end;
                i = end;
            }
            _ if is_identifier_byte(b) => {
                // Skip the whole word so digits inside it are not literals.
                while i < bytes.len() && is_identifier_byte(bytes[i]) {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    hasher.update(&bytes[start..]);
    hasher.digest128()
}

/// The statement with every literal (numbers and quoted strings) replaced
/// by `?`: safe to show to operators, who must never see values.
pub fn normalized(sql: &str) -> String {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len().min(1024));
    let mut i = 0;
    while i < bytes.len() && out.len() < 1024 {
        let b = bytes[i];
        match b {
            b'\'' => {
                out.push('?');
                i = skip_quoted(bytes, i, b);
            }
            b'$' => {
                // Dollar quotes and parameters alike become `?`.
                out.push('?');
                let rest = &sql[i + 1..];
                match rest.find('$') {
                    Some(end)
                        if rest[..end].chars().all(|c| c.is_alphanumeric() || c == '_')
                            && !rest[..end].chars().all(|c| c.is_ascii_digit())
                            || rest.starts_with('$') =>
                    {
                        let tag = &sql[i..i + end + 2];
                        i = sql[i + tag.len()..]
                            .find(tag)
                            .map_or(bytes.len(), |p| i + tag.len() + p + tag.len());
                    }
                    _ => {
                        i += 1;
                        while i < bytes.len() && bytes[i].is_ascii_digit() {
                            i += 1;
                        }
                    }
                }
            }
            b'0'..=b'9' if i == 0 || !is_identifier_byte(bytes[i - 1]) => {
                out.push('?');
                i = number_end(bytes, i);
            }
            _ if is_identifier_byte(b) || b == b'"' => {
                let start = i;
                if b == b'"' {
                    i = skip_quoted(bytes, i, b);
                } else {
                    while i < bytes.len() && is_identifier_byte(bytes[i]) {
                        i += 1;
                    }
                }
                out.push_str(&sql[start..i]);
            }
            _ => {
                let ch_len = sql[i..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&sql[i..i + ch_len]);
                i += ch_len;
            }
        }
    }
    out
}

fn is_identifier_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

fn has_escape_string(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .any(|w| (w[0] == b'E' || w[0] == b'e') && w[1] == b'\'')
}

/// Index just past a quoted run starting at `i`; a doubled quote is an
/// escaped quote, not the end.
fn skip_quoted(bytes: &[u8], i: usize, quote: u8) -> usize {
    let mut j = i + 1;
    while j < bytes.len() {
        if bytes[j] == quote {
            if bytes.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    bytes.len()
}

fn number_end(bytes: &[u8], i: usize) -> usize {
    let mut j = i;
    while j < bytes.len()
        && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'.' || bytes[j] == b'_')
    {
        // 1e-5: the sign right after an exponent belongs to the number.
        if (bytes[j] == b'e' || bytes[j] == b'E') && matches!(bytes.get(j + 1), Some(b'-' | b'+')) {
            j += 1;
        }
        j += 1;
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalized_text_has_no_literals() {
        assert_eq!(
            normalized("SELECT a1 FROM t2 WHERE id = 42 AND name = 'bob''s' AND x = $1"),
            "SELECT a1 FROM t2 WHERE id = ? AND name = ? AND x = ?"
        );
        assert_eq!(normalized("SELECT $$secret$$, $tag$x$tag$"), "SELECT ?, ?");
    }

    #[test]
    fn numbers_fold_and_nothing_else_does() {
        let a = fingerprint("SELECT abalance FROM pgbench_accounts WHERE aid = 12;");
        let b = fingerprint("SELECT abalance FROM pgbench_accounts WHERE aid = 99812;");
        assert_eq!(a, b);
        assert_ne!(
            fingerprint("SELECT * FROM t1"),
            fingerprint("SELECT * FROM t2")
        );
        assert_ne!(fingerprint("SELECT 'a1'"), fingerprint("SELECT 'a2'"));
        assert_ne!(
            fingerprint("SELECT \"c1\" FROM t"),
            fingerprint("SELECT \"c2\" FROM t")
        );
        assert_ne!(
            fingerprint("SELECT 1 /* pgstash:ttl=1s */"),
            fingerprint("SELECT 1 /* pgstash:ttl=2s */")
        );
        assert_eq!(fingerprint("SELECT 1.5e-3"), fingerprint("SELECT 2"));
        assert_ne!(
            fingerprint("SELECT 'now'::date"),
            fingerprint("SELECT 'x'::date")
        );
        assert_ne!(fingerprint("SELECT $$1$$"), fingerprint("SELECT $$2$$"));
    }
}
