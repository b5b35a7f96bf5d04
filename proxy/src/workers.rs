//! Session workers: threads each running its own single-threaded runtime,
//! as nginx and Envoy run one event loop per core; by default one per two
//! CPUs (see [`default_count`]).
//!
//! A client's session lives on one worker from login to goodbye, and so do
//! the server connections it borrows: a connection idle in the pool is
//! registered with the reactor of the worker that last used it, and moves
//! (re-registers) only when another worker borrows it. A transaction's
//! wakeups therefore stay on one thread. tokio's work-stealing runtime
//! instead hands tasks between threads with a futex wake and a search of
//! the other queues; measured on 2 cores under `pgbench -S -c 16`, a bare
//! tokio forwarder on it spent more CPU per transaction than all of
//! PgBouncer.
//!
//! The runtime the proxy was started on keeps the accept loop and its
//! background tasks (statistics, idle-connection closing, the metadata
//! follower, the metrics listener). Tasks a session starts (a shard's
//! health monitor, bb8's connects) run on the session's worker.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;

thread_local! {
    /// This thread's worker number, 0 on threads that are not workers.
    static HOME: Cell<u32> = const { Cell::new(0) };
}

/// Workers for `worker_threads = 0`: one per two CPUs (hardware threads,
/// so about one per physical core), at least one. One event loop carries
/// far more than one core's share of a proxy's work: a single worker served
/// 40,000 `pgbench -S` transactions per second using 40% of a core. A proxy
/// shares its machine with its clients, a database or SMT siblings, and
/// every further worker adds cross-thread handoffs (a connection one worker
/// released, borrowed by another). On 2 CPUs (benches/pgbench-compare.sh,
/// ROUNDS=3) two workers against one cost 10-15% more CPU per transaction
/// for no more TPS, and with 500 clients on a pool of 20 served 0.84 of
/// PgBouncer's TPS against 0.97.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Worker numbers, unique in the process (tests run several proxies).
static NEXT_HOME: AtomicU32 = AtomicU32::new(1);

/// The worker this thread is, or 0 when it is none: a server connection
/// registered with this thread's reactor records it (see
/// [`crate::server::ServerConn::settle`]).
#[inline]
pub fn home() -> u32 {
    HOME.with(Cell::get)
}

/// Stripes of what every worker writes (a counter, a histogram): each
/// worker writes its own, so a write never takes a cache line from the
/// other cores. Worker numbers spread over them; readers sum them.
pub const STRIPES: usize = 4;

/// One value per stripe, each on cache lines of its own (see [`STRIPES`]).
#[derive(Default)]
pub struct Striped<T>([Padded<T>; STRIPES]);

#[derive(Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl<T> Striped<T> {
    /// This thread's stripe, the one it writes.
    #[inline]
    pub fn mine(&self) -> &T {
        &self.0[home() as usize % STRIPES].0
    }

    /// Every stripe, for a reader to sum.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|p| &p.0)
    }
}

/// A counter every worker adds to, striped (see [`STRIPES`]).
#[derive(Default)]
pub struct StripedCounter(Striped<AtomicU64>);

impl StripedCounter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.mine().fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.all().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// The session workers of one proxy (none: one thread for everything).
/// Dropping it stops them; their tasks are dropped without waiting (the
/// proxy has drained its clients first).
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: tokio::runtime::Handle,
    /// Sessions running on this worker: a new client goes to the least busy.
    sessions: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Workers {
    /// Starts the workers `worker_threads` asks for: 0 is
    /// [`default_count`], 1 none (sessions then run on the caller's
    /// runtime, on one thread).
    pub fn start(worker_threads: u32) -> std::io::Result<Workers> {
        let n = match worker_threads {
            0 => default_count(),
            n => n as usize,
        };
        let n = if n > 1 { n } else { 0 };
        let mut workers = Vec::with_capacity(n);
        for _ in 0..n {
            let home = NEXT_HOME.fetch_add(1, Ordering::Relaxed);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (started, handle) = std::sync::mpsc::sync_channel(1);
            // The runtime is built and dropped on its own thread: dropped
            // here, inside the caller's runtime, it would panic.
            std::thread::Builder::new()
                .name(format!("shardline-worker-{home}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => return drop(started.send(Err(e))),
                    };
                    HOME.with(|h| h.set(home));
                    let _ = started.send(Ok(runtime.handle().clone()));
                    // Runs the sessions until the proxy stops (or drops the
                    // sender, when it could not start).
                    let _ = runtime.block_on(stopped);
                    runtime.shutdown_background();
                })?;
            let handle = handle
                .recv()
                .map_err(|_| std::io::Error::other("a worker thread ended at its start"))??;
            workers.push(Worker {
                handle,
                sessions: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
            });
        }
        Ok(Workers { workers })
    }

    /// Serves a client accepted on the caller's runtime: `serve(stream)`
    /// runs on the worker with the fewest sessions, with the socket
    /// registered with that worker's reactor; without workers, here.
    pub fn serve<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = (self.workers.iter()).min_by_key(|w| w.sessions.load(Ordering::Relaxed))
        else {
            tokio::spawn(serve(stream));
            return;
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => return tracing::warn!(error = %e, "cannot hand a client to a worker"),
        };
        let sessions = worker.sessions.clone();
        sessions.fetch_add(1, Ordering::Relaxed);
        let counted = Counted(sessions);
        worker.handle.spawn(async move {
            let _counted = counted;
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::warn!(error = %e, "cannot serve a client on its worker"),
            }
        });
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            if let Some(stop) = worker.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

/// A session on a worker, counted until it ends (or is dropped unfinished).
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
