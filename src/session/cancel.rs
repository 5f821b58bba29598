//! Cancel keys: each client gets pgstash's own BackendKeyData, and a
//! CancelRequest carrying it is relayed to whichever server is running the
//! client's work at that moment (or dropped if the client is idle).
//!
//! A cancel must never hit the next client of the same server connection.
//! While a relayed cancel is in flight (until Postgres has signalled its
//! backend and closed the cancel connection), a client that lets go of its
//! server closes that connection instead of returning it to the pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where a cancel for a client would go now.
#[derive(Debug, Clone)]
pub struct ServerCancel {
    pub addr: String,
    pub pid: i32,
    pub secret: i32,
}

/// Where one client's cancels go, and whether one is on its way.
#[derive(Default)]
pub struct Slot {
    target: Mutex<Option<ServerCancel>>,
    in_flight: AtomicBool,
}

pub type CancelSlot = Arc<Slot>;

impl Slot {
    /// The client now runs its work on this server.
    pub fn attach(&self, target: ServerCancel) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(target);
    }

    /// The client lets go of its server. `true`: a cancel may still reach
    /// that server, which must then not serve anyone else.
    #[must_use]
    pub fn detach(&self) -> bool {
        let mut target = self.target.lock().unwrap_or_else(|e| e.into_inner());
        *target = None;
        // Read under the lock a cancel takes to read the target, so a
        // cancel that saw this server is seen here.
        self.in_flight.load(Ordering::Acquire)
    }
}

/// How long relaying one cancel may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<(i32, i32), CancelSlot>>,
    /// CancelRequests whose key matched no client.
    pub unmatched: AtomicU64,
}

impl CancelRegistry {
    /// Issues a fresh random key for a client.
    pub fn register(&self) -> ((i32, i32), CancelSlot) {
        let slot: CancelSlot = Arc::new(Slot::default());
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let key = (rand::random::<i32>() & 0x7fff_ffff, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(e) = clients.entry(key) {
                e.insert(slot.clone());
                return (key, slot);
            }
        }
    }

    pub fn unregister(&self, key: (i32, i32)) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    /// Relays a cancel; a wrong key or an idle client cancels nothing.
    pub async fn cancel(&self, key: (i32, i32)) {
        let slot = {
            let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            clients.get(&key).cloned()
        };
        let Some(slot) = slot else {
            self.unmatched.fetch_add(1, Ordering::Relaxed);
            crate::admin::metrics::cancel_request("unmatched");
            tracing::debug!("cancel request with an unknown key");
            return;
        };
        let target = {
            let target = slot.target.lock().unwrap_or_else(|e| e.into_inner());
            if target.is_some() {
                slot.in_flight.store(true, Ordering::Release);
            }
            target.clone()
        };
        let Some(target) = target else {
            crate::admin::metrics::cancel_request("idle");
            tracing::debug!("cancel request for an idle client");
            return;
        };
        crate::admin::metrics::cancel_request("relayed");
        if tokio::time::timeout(CANCEL_TIMEOUT, relay(&target))
            .await
            .is_err()
        {
            tracing::warn!(addr = %target.addr, "relaying a cancel request timed out");
        }
        slot.in_flight.store(false, Ordering::Release);
    }
}

/// Sends the CancelRequest and waits until Postgres closes the connection,
/// which it does after signalling the backend.
async fn relay(target: &ServerCancel) {
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(target.pid, target.secret, &mut buf);
    match tokio::net::TcpStream::connect(&target.addr).await {
        Ok(mut stream) => {
            if stream.write_all(&buf).await.is_ok() {
                let mut rest = [0u8; 64];
                while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot relay cancel request"),
    }
}
