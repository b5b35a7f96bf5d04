//! CancelRegistry: maps the BackendKeyData the proxy gave each client to
//! that client; a CancelRequest goes to the server connections lent to it
//! right now.
//!
//! Clients never see a server's key. A CancelRequest arrives on a new
//! connection with the proxy's key; the proxy finds the servers linked to
//! that client ([`ServerInfo::link`], set while a connection is lent, as
//! PgBouncer follows a client's link to its server) and forwards a
//! CancelRequest with each one's key. A session thus shares nothing with
//! the registry per transaction. Unknown keys are ignored, as PostgreSQL
//! does.
//!
//! [`ServerInfo::link`]: crate::server::ServerInfo::link

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::clients::ClientId;
use crate::server::CancelKey;
use crate::shared::Shared;

#[derive(Default)]
pub struct CancelRegistry {
    /// By the process id the client got: its secret key, and the client.
    clients: Mutex<HashMap<i32, (i32, ClientId)>>,
}

impl CancelRegistry {
    pub fn register(&self, process_id: i32, secret_key: i32, client: ClientId) {
        self.clients
            .lock()
            .expect("lock poisoned")
            .insert(process_id, (secret_key, client));
    }

    pub fn unregister(&self, process_id: i32) {
        self.clients
            .lock()
            .expect("lock poisoned")
            .remove(&process_id);
    }

    /// The client a CancelRequest's key belongs to, if the key matches.
    fn client(&self, process_id: i32, secret_key: i32) -> Option<ClientId> {
        match self.clients.lock().expect("lock poisoned").get(&process_id) {
            Some(&(secret, client)) if secret == secret_key => Some(client),
            _ => None,
        }
    }
}

/// Forwards a client's CancelRequest to the servers working for it now
/// (one, or each shard's in a multi-shard statement).
pub async fn cancel(shared: &Shared, process_id: i32, secret_key: i32) {
    let Some(client) = shared.cancels.client(process_id, secret_key) else {
        tracing::debug!(process_id, "cancel request with an unknown key");
        return;
    };
    let keys: Vec<CancelKey> = (shared.pools.all().iter())
        .flat_map(|(_, pool)| pool.servers())
        .filter(|s| s.is_active() && s.link.load(Ordering::Relaxed) == client.0)
        .map(|s| s.cancel_key)
        .collect();
    if keys.is_empty() {
        tracing::debug!(process_id, "cancel request for no running query");
    }
    for key in keys {
        forward(key).await;
    }
}

async fn forward(key: CancelKey) {
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(key.process_id, key.secret_key, &mut buf);
    match TcpStream::connect(key.addr).await {
        Ok(mut stream) => {
            if let Err(e) = stream.write_all(&buf).await {
                tracing::warn!(error = %e, "could not forward cancel request");
                return;
            }
            // PostgreSQL closes the connection once it has signalled the
            // backend. Waiting for that before the client's cancel
            // connection closes keeps a late signal from hitting the
            // client's next query (libpq waits the same way).
            let mut sink = [0u8; 64];
            let drained = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drained).await;
        }
        Err(e) => tracing::warn!(error = %e, "could not connect to forward cancel request"),
    }
}
