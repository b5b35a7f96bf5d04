//! The console's commands that change what the proxy does: `RELOAD`,
//! `PAUSE [db]`, `RESUME [db]` and `SHUTDOWN`.
//!
//! `PAUSE` stops new checkouts (clients wait, up to `checkout_timeout`, as
//! they would for a full pool) and answers once every server connection
//! of the paused pools is back: open transactions finish first. Unlike
//! PgBouncer's it does not wait forever: past `[proxy] pause_timeout` it
//! undoes itself and fails, so the console is never stuck.

use std::time::Duration;

use bytes::BytesMut;
use wire::{backend, rows};

use std::sync::Arc;

use crate::pool::{Pool, PoolKey};
use crate::shared::{Control, Shared};

fn notice(out: &mut BytesMut, severity: &str, message: &str) {
    backend::encode_error(out, backend::NOTICE_RESPONSE, severity, "00000", message);
}

fn error(out: &mut BytesMut, code: &str, message: &str) {
    backend::encode_error(out, backend::ERROR_RESPONSE, "ERROR", code, message);
}

pub async fn reload(shared: &Shared, out: &mut BytesMut) {
    match crate::reload::reload(shared).await {
        Ok(r) => {
            if !r.applied.is_empty() {
                notice(out, "NOTICE", &format!("applied: {}", r.applied.join(", ")));
            }
            if !r.needs_restart.is_empty() {
                let message = format!(
                    "changed in the file but not applied (they need a restart): {}",
                    r.needs_restart.join(", ")
                );
                notice(out, "WARNING", &message);
            }
            rows::encode_command_complete(out, b"RELOAD");
        }
        // config_file_error
        Err(e) => error(out, "F0000", &format!("RELOAD failed: {e}")),
    }
}

/// `PAUSE` (every database) or `PAUSE db`.
pub async fn pause(shared: &Shared, database: Option<&str>, out: &mut BytesMut) {
    if let Some(db) = database {
        if shared.database(db).is_none() {
            return error(out, "3D000", &format!("database \"{db}\" does not exist"));
        }
    }
    let generation = {
        let mut control = shared.control.lock().expect("lock poisoned");
        let already = match database {
            None => control.paused_all,
            Some(db) => control.is_paused(db),
        };
        if already {
            drop(control);
            return error(out, "55000", "already paused");
        }
        match database {
            None => control.paused_all = true,
            Some(db) => {
                control.paused.insert(db.to_owned());
            }
        }
        control.generation += 1;
        control.generation
    };
    // After the state is set: a pool made from now on starts paused.
    let pools: Vec<_> = (shared.pools.all().into_iter())
        .filter(|((db, _, _), _)| database.map_or(true, |d| d == db))
        .map(|(_, pool)| pool)
        .collect();
    for pool in &pools {
        pool.set_paused(true);
    }
    // Undone unless it completes: on timeout, and if the console's client
    // goes away (the future is dropped) while it waits.
    let mut guard = PauseGuard {
        shared,
        database,
        generation,
        completed: false,
    };
    let timeout = shared.effective().proxy.pause_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if shared.control.lock().expect("lock poisoned").generation != generation {
            // A RESUME (or a PAUSE after one) came first: its state stands.
            guard.completed = true;
            return error(
                out,
                "57014",
                "PAUSE was superseded by a RESUME before every server connection came back",
            );
        }
        let in_use: u32 = pools.iter().map(|p| p.in_use()).sum();
        if in_use == 0 {
            guard.completed = true;
            return rows::encode_command_complete(out, b"PAUSE");
        }
        if tokio::time::Instant::now() >= deadline {
            drop(guard);
            let message = format!(
                "PAUSE did not complete: {in_use} server connections were still in use after \
                 {timeout:?} (pause_timeout); the pause was undone"
            );
            return error(out, "57014", &message);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Undoes a PAUSE that did not complete, when dropped.
struct PauseGuard<'a> {
    shared: &'a Shared,
    database: Option<&'a str>,
    /// The control generation this PAUSE set.
    generation: u64,
    completed: bool,
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        let pools = self.shared.pools.all();
        let mut control = self.shared.control.lock().expect("lock poisoned");
        if control.generation != self.generation {
            return; // a RESUME or another PAUSE came since: its state stands
        }
        match self.database {
            None => control.paused_all = false,
            Some(db) => {
                control.paused.remove(db);
            }
        }
        unpause_pools(&control, &pools);
    }
}

/// Lets every pool that is no longer paused hand out connections again
/// (under the control lock, so a PAUSE cannot come in between).
fn unpause_pools(control: &Control, pools: &[(PoolKey, Arc<Pool>)]) {
    for ((db, _, _), pool) in pools {
        if !control.is_paused(db) {
            pool.set_paused(false);
        }
    }
}

/// `RESUME` (everything) or `RESUME db`.
pub fn resume(shared: &Shared, database: Option<&str>, out: &mut BytesMut) {
    let pools = shared.pools.all();
    {
        let mut control = shared.control.lock().expect("lock poisoned");
        let paused = match database {
            None => control.paused_all || !control.paused.is_empty(),
            Some(db) => control.paused.contains(db),
        };
        if !paused {
            drop(control);
            let message = match database {
                Some(db) if shared.effective().databases.iter().any(|d| d.name == db) => {
                    format!("database \"{db}\" is not paused on its own (RESUME resumes all)")
                }
                Some(db) => format!("database \"{db}\" is not paused"),
                None => "nothing is paused".to_owned(),
            };
            return error(out, "55000", &message);
        }
        match database {
            None => {
                control.paused_all = false;
                control.paused.clear();
            }
            Some(db) => {
                control.paused.remove(db);
            }
        }
        control.generation += 1;
        unpause_pools(&control, &pools);
    }
    rows::encode_command_complete(out, b"RESUME");
}

/// Starts the graceful shutdown; the proxy's accept loop does the rest.
pub fn shutdown(shared: &Shared, out: &mut BytesMut) {
    let timeout = shared.effective().proxy.shutdown_timeout;
    shared.begin_shutdown();
    let message = format!(
        "shutting down: no new clients; open transactions may finish within {timeout:?} \
         (shutdown_timeout), idle clients are disconnected"
    );
    notice(out, "NOTICE", &message);
    rows::encode_command_complete(out, b"SHUTDOWN");
}
