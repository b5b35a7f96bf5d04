//! MetaClient: how proxies and the admin CLI talk to the metadata group.
//!
//! It knows a list of node addresses, finds the leader (following
//! `NotLeader` answers), retries retryable failures with backoff within a
//! time budget, and turns watch connections into a stream of maps that
//! resumes on any node after a failure and never goes backwards.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use router::ShardMap;

use crate::command::{Command, Refused};
use crate::error::{Error, Result};
use crate::rpc::{self, read_frame, write_frame, ClusterStatus, Request, Response};
use crate::state::MetaState;
use crate::types::{Applied, NodeId};

/// Bound on the maps a watcher may have queued but not yet taken.
pub const WATCH_QUEUE_MAX: usize = 64;

#[derive(Clone)]
pub struct MetaClient {
    addrs: Arc<Vec<String>>,
    /// The last node known to lead; tried first.
    leader: Arc<Mutex<Option<String>>>,
    /// Per-attempt timeout.
    pub rpc_timeout: Duration,
    /// Total time a call keeps retrying before giving up.
    pub budget: Duration,
}

impl MetaClient {
    pub fn new(addrs: Vec<String>) -> MetaClient {
        MetaClient {
            addrs: Arc::new(addrs),
            leader: Arc::new(Mutex::new(None)),
            rpc_timeout: Duration::from_secs(6),
            budget: Duration::from_secs(15),
        }
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Sends a leader-only request, following redirects and retrying over
    /// all known nodes until the budget runs out.
    async fn leader_call(&self, make: impl Fn() -> Request) -> Result<Response> {
        let deadline = tokio::time::Instant::now() + self.budget;
        let mut backoff = Duration::from_millis(20);
        let mut next = 0usize;
        if self.addrs.is_empty() {
            return Err(Error::NoLeader("no metadata node addresses given".into()));
        }
        let mut last_error;
        loop {
            let addr = self
                .leader
                .lock()
                .expect("lock poisoned")
                .clone()
                .unwrap_or_else(|| {
                    let a = self.addrs[next % self.addrs.len()].clone();
                    next += 1;
                    a
                });
            match rpc::call(&addr, &make(), self.rpc_timeout).await {
                Ok(Response::NotLeader { leader }) => {
                    *self.leader.lock().expect("lock poisoned") = leader.map(|(_, a)| a);
                    last_error = format!("{addr} is not the leader");
                    if leader_unknown(&self.leader) {
                        // An election is under way: give it a moment.
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(200));
                    }
                }
                Ok(Response::Unavailable(why)) => {
                    *self.leader.lock().expect("lock poisoned") = None;
                    last_error = format!("{addr}: {why}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                Ok(reply) => {
                    *self.leader.lock().expect("lock poisoned") = Some(addr);
                    return Ok(reply);
                }
                Err(e) => {
                    *self.leader.lock().expect("lock poisoned") = None;
                    last_error = e.to_string();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NoLeader(last_error));
            }
        }
    }

    /// Proposes a command and waits until it is committed and applied.
    pub async fn propose(&self, command: Command) -> Result<Applied> {
        match self
            .leader_call(|| Request::Propose(command.clone()))
            .await?
        {
            Response::Applied(applied) => Ok(applied),
            Response::Refused(why) => Err(Error::Refused(Refused(why))),
            other => Err(unexpected(other)),
        }
    }

    /// The whole state, read linearizably from the leader, with the leader's clock.
    pub async fn read(&self) -> Result<(MetaState, u64)> {
        match self.leader_call(|| Request::Read).await? {
            Response::State { state, now_ms } => Ok((state, now_ms)),
            other => Err(unexpected(other)),
        }
    }

    pub async fn status(&self) -> Result<ClusterStatus> {
        match self.leader_call(|| Request::Status).await? {
            Response::Status(status) => Ok(*status),
            other => Err(unexpected(other)),
        }
    }

    /// Adds a node as a learner, waits for it to catch up, then makes it a voter.
    pub async fn add_member(&self, id: NodeId, addr: &str) -> Result<()> {
        let addr = addr.to_owned();
        match self
            .leader_call(|| Request::AddMember {
                id,
                addr: addr.clone(),
            })
            .await?
        {
            Response::Done => Ok(()),
            Response::Refused(why) => Err(Error::Refused(Refused(why))),
            other => Err(unexpected(other)),
        }
    }

    pub async fn remove_member(&self, id: NodeId) -> Result<()> {
        match self.leader_call(|| Request::RemoveMember { id }).await? {
            Response::Done => Ok(()),
            Response::Refused(why) => Err(Error::Refused(Refused(why))),
            other => Err(unexpected(other)),
        }
    }

    /// Maps with an epoch above `after`, in epoch order, each exactly once,
    /// for as long as the receiver is kept. Reconnects to any node after a
    /// failure and resumes after the last epoch delivered.
    pub fn watch(&self, after: u64) -> mpsc::Receiver<Arc<ShardMap>> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE_MAX);
        let addrs = self.addrs.clone();
        let timeout = self.rpc_timeout;
        tokio::spawn(async move {
            let mut last = after;
            let mut backoff = Duration::from_millis(20);
            for addr in addrs.iter().cycle() {
                match follow(addr, &mut last, &tx, timeout).await {
                    Ok(()) => return, // the receiver was dropped
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "metadata watch interrupted; resuming elsewhere");
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(200));
                    }
                }
            }
        });
        rx
    }
}

fn leader_unknown(leader: &Mutex<Option<String>>) -> bool {
    leader.lock().expect("lock poisoned").is_none()
}

fn unexpected(reply: Response) -> Error {
    match reply {
        Response::Failed(why) => Error::Raft(why),
        other => Error::Protocol(format!("{other:?}")),
    }
}

/// One watch connection: forwards maps newer than `last` until it fails.
/// `Ok` means the receiver is gone.
async fn follow(
    addr: &str,
    last: &mut u64,
    tx: &mpsc::Sender<Arc<ShardMap>>,
    timeout: Duration,
) -> Result<()> {
    let io = |source| Error::Io {
        addr: addr.to_owned(),
        source,
    };
    let mut stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
        .map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    write_frame(&mut stream, &Request::Watch { after: *last })
        .await
        .map_err(io)?;
    loop {
        let reply = tokio::select! {
            _ = tx.closed() => return Ok(()),
            r = read_frame::<_, Response>(&mut stream) => r.map_err(io)?,
        };
        match reply {
            Some(Response::Map(map)) => {
                if map.epoch.0 <= *last {
                    continue; // never backwards, never twice
                }
                *last = map.epoch.0;
                if tx.send(Arc::new(*map)).await.is_err() {
                    return Ok(());
                }
            }
            Some(other) => return Err(unexpected(other)),
            None => {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "watch closed by the node",
                )))
            }
        }
    }
}
