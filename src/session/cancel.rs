//! Cancel keys: each client gets pgstash's own BackendKeyData, and a
//! CancelRequest carrying it is relayed to whichever server is running the
//! client's work at that moment (or dropped if the client is idle).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

/// Where a cancel for a client would go now.
#[derive(Debug, Clone)]
pub struct ServerCancel {
    pub addr: String,
    pub pid: i32,
    pub secret: i32,
}

pub type CancelSlot = Arc<Mutex<Option<ServerCancel>>>;

#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<(i32, i32), CancelSlot>>,
}

impl CancelRegistry {
    /// Issues a fresh random key for a client.
    pub fn register(&self) -> ((i32, i32), CancelSlot) {
        let slot: CancelSlot = Arc::new(Mutex::new(None));
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
        let target = {
            let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            clients
                .get(&key)
                .and_then(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).clone())
        };
        let Some(target) = target else {
            tracing::debug!("cancel request matched no running query");
            return;
        };
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(target.pid, target.secret, &mut buf);
        match tokio::net::TcpStream::connect(&target.addr).await {
            Ok(mut stream) => {
                let _ = stream.write_all(&buf).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot relay cancel request"),
        }
    }
}
