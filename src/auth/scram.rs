//! SCRAM-SHA-256 pass-through: after a client proved its password against a
//! verifier, the ClientKey it used is recovered from its proof, and with
//! that key (and the verifier's ServerKey) pgstash logs in to Postgres as
//! the client, as PgBouncer does, without ever knowing the password.
//!
//! The client side here differs from a password-based SCRAM client only in
//! starting from the keys instead of deriving them; message parsing stays
//! minimal because Postgres is the other party and the final signature
//! check rejects anything that went wrong.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::{digest, hmac};

/// The two keys that stand in for a password in SCRAM.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

pub(crate) fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, message).as_ref().to_vec()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, data).as_ref().to_vec()
}

/// StoredKey = H(HMAC(SaltedPassword, "Client Key")), what a verifier
/// keeps of a password.
pub fn stored_key(salted_password: &[u8]) -> Vec<u8> {
    sha256(&hmac_sha256(salted_password, b"Client Key"))
}

fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}

/// The client-first message without its GS2 header (`n,,` / `y,,` /
/// `p=…,,`).
fn client_first_bare(client_first: &str) -> Option<&str> {
    let mut parts = client_first.splitn(3, ',');
    parts.next()?;
    parts.next()?;
    parts.next()
}

/// Recovers the ClientKey from a client's successful exchange:
/// ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage). Checked
/// against StoredKey, so a key is only returned if it is the right one.
pub fn recover_client_key(
    stored_key: &[u8],
    client_first: &[u8],
    server_first: &str,
    client_final: &[u8],
) -> Option<Vec<u8>> {
    let client_first = std::str::from_utf8(client_first).ok()?;
    let client_final = std::str::from_utf8(client_final).ok()?;
    let (without_proof, proof) = client_final.rsplit_once(",p=")?;
    let proof = STANDARD.decode(proof).ok()?;
    let auth_message = format!(
        "{},{server_first},{without_proof}",
        client_first_bare(client_first)?
    );
    let client_key = xor(&proof, &hmac_sha256(stored_key, auth_message.as_bytes()));
    (proof.len() == stored_key.len() && sha256(&client_key) == stored_key).then_some(client_key)
}

/// pgstash's side of a SCRAM login to Postgres with known keys.
pub struct KeyedScramClient {
    keys: ScramKeys,
    nonce: String,
    auth_message: String,
}

impl KeyedScramClient {
    pub fn new(keys: ScramKeys) -> Self {
        let nonce = STANDARD.encode(rand::random::<[u8; 18]>());
        KeyedScramClient {
            keys,
            nonce,
            auth_message: String::new(),
        }
    }

    /// The SASLInitialResponse data. The user name is empty: Postgres takes
    /// it from the startup message.
    pub fn client_first(&self) -> String {
        format!("n,,n=,r={}", self.nonce)
    }

    /// Answers the server-first message with the client-final message.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<String, String> {
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| "server-first is not UTF-8")?;
        let nonce = server_first
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or("server-first without nonce")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err("server nonce does not extend the client's".into());
        }
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("n=,r={},{server_first},{without_proof}", self.nonce);
        let stored_key = sha256(&self.keys.client_key);
        let signature = hmac_sha256(&stored_key, self.auth_message.as_bytes());
        let proof = xor(&self.keys.client_key, &signature);
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)))
    }

    /// Checks the server's signature: the server holds the same verifier.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(server_final).map_err(|_| "server-final is not UTF-8")?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(format!("server refused SCRAM: {error}"));
        }
        let signature = text
            .strip_prefix("v=")
            .and_then(|v| STANDARD.decode(v).ok())
            .ok_or("malformed server-final message")?;
        let expected = hmac_sha256(&self.keys.server_key, self.auth_message.as_bytes());
        if super::same(&signature, &expected) {
            Ok(())
        } else {
            Err("server signature does not match".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys derived from a password the way SCRAM does.
    fn keys(password: &str, salt: &[u8], iterations: u32) -> (ScramKeys, Vec<u8>) {
        let salted = pgwire::api::auth::sasl::scram::gen_salted_password(
            password,
            salt,
            iterations as usize,
        );
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored_key = sha256(&client_key);
        let server_key = hmac_sha256(&salted, b"Server Key");
        (
            ScramKeys {
                client_key,
                server_key,
            },
            stored_key,
        )
    }

    #[test]
    fn client_key_survives_a_round_trip() {
        let (keys, stored_key) = keys("pencil", b"salty", 4096);
        let mut client = KeyedScramClient::new(keys.clone());
        let client_first = client.client_first();
        let server_first = format!("r={}SERVER,s=c2FsdHk=,i=4096", client.nonce);
        let client_final = client.client_final(server_first.as_bytes()).unwrap();
        let recovered = recover_client_key(
            &stored_key,
            client_first.as_bytes(),
            &server_first,
            client_final.as_bytes(),
        );
        assert_eq!(recovered.as_deref(), Some(&keys.client_key[..]));
        let signature = hmac_sha256(&keys.server_key, client.auth_message.as_bytes());
        let server_final = format!("v={}", STANDARD.encode(signature));
        assert!(client.verify_server_final(server_final.as_bytes()).is_ok());
        assert!(client.verify_server_final(b"v=AAAA").is_err());
        let tampered = client_final.replace("c=biws", "c=eSws");
        assert!(recover_client_key(
            &stored_key,
            client_first.as_bytes(),
            &server_first,
            tampered.as_bytes()
        )
        .is_none());
    }
}
