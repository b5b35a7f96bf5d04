//! CancelRegistry: maps the BackendKeyData the proxy gave each client to the
//! server connection that client is using right now.
//!
//! Clients never see a server's key. A CancelRequest arrives on a new
//! connection with the proxy's key; the proxy forwards a CancelRequest with the
//! server's key to that server. Unknown keys are ignored, as PostgreSQL does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::server::CancelKey;

/// The server a client is attached to, if any; shared with its session.
pub type CancelTarget = Arc<Mutex<Option<CancelKey>>>;

#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<i32, (i32, CancelTarget)>>,
}

impl CancelRegistry {
    pub fn register(&self, process_id: i32, secret_key: i32) -> CancelTarget {
        let target = CancelTarget::default();
        self.clients
            .lock()
            .expect("lock poisoned")
            .insert(process_id, (secret_key, target.clone()));
        target
    }

    pub fn unregister(&self, process_id: i32) {
        self.clients
            .lock()
            .expect("lock poisoned")
            .remove(&process_id);
    }

    /// Forwards a client's CancelRequest to its current server, if the key matches.
    pub async fn cancel(&self, process_id: i32, secret_key: i32) {
        let key = {
            let clients = self.clients.lock().expect("lock poisoned");
            match clients.get(&process_id) {
                Some((secret, target)) if *secret == secret_key => {
                    *target.lock().expect("lock poisoned")
                }
                _ => None,
            }
        };
        let Some(key) = key else {
            tracing::debug!(process_id, "cancel request for no running query");
            return;
        };
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(
            key.process_id,
            key.secret_key,
            &mut buf,
        );
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
                let drained =
                    async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drained).await;
            }
            Err(e) => tracing::warn!(error = %e, "could not connect to forward cancel request"),
        }
    }
}
