//! Client authentication. Clients are trusted for now; this is the one
//! place where a method other than `trust` will plug in.

use bytes::BytesMut;

use crate::protocol::messages;

/// The outcome of authenticating a client.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    Accepted,
}

/// Authenticates a client by (database, user) and appends the messages the
/// client must receive for it.
pub fn authenticate(_database: &str, _user: &str, out: &mut BytesMut) -> AuthOutcome {
    messages::authentication_ok(out);
    AuthOutcome::Accepted
}
