//! Session: one client connection, from startup to Terminate.
//!
//! After login the session is a small event loop over two sockets (the client
//! and, while it holds one, a server connection) and two output buffers. It
//! decodes only frame headers and the few messages it must look into; every
//! other frame is copied through unchanged. DataRow and CopyData frames larger
//! than [`STREAM_THRESHOLD`] are streamed in pieces, so a 100 MB row never sits
//! in memory whole. Reads stop while the opposite output buffer is full, which
//! bounds memory per session and pushes back on fast senders.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use twox_hash::XxHash3_64;
use wire::backend::{self, TransactionStatus};
use wire::frontend::{self, Bind, Parse, Target};
use wire::{Frame, Header};

use crate::backends::Hold;
use crate::buffers;
use crate::cold::cold;
use crate::config::{PoolMode, ReadFrom};
use crate::error::{Error, Result};
use crate::params;
use crate::pending::{Effects, Entry, Expect, LocalReply, Pending};
use crate::pool::{Borrower, Pool, Pooled};
use crate::result_cache::{Fill, Invalidations, PointRead, ResultCache};
use crate::server::{statement_name, ParamState};
use crate::shared::Shared;
use crate::slo::SloWindow;
use crate::statement_stats::{LatencyHistogram, Route, KIND_POSTGRES};
use router::{SessionEffect, ShardId};

mod copy_in;
mod routing;
mod timing;

/// DataRow and CopyData frames above this size are streamed, not buffered.
pub const STREAM_THRESHOLD: usize = 64 << 10;
/// The largest frame accepted at all (streamed frames included): PostgreSQL's
/// own ceiling for one message is 1 GB.
const FRAME_BYTES_MAX: u32 = (1 << 30) - 1;

/// Gives up sending the read in flight elsewhere: what is held of its reply
/// goes to the client. (Field by field, for callers holding the server
/// connection borrowed.)
fn keep_read(retry: &mut Option<Retry>, held: &mut BytesMut, cout: &mut BytesMut) {
    if retry.take().is_some() {
        cout.extend_from_slice(held);
        held.clear();
    }
}

/// An ErrorResponse that means the server is ending the connection (it is
/// shutting down or crashed), not that the statement failed.
fn server_going_away(body: &[u8]) -> bool {
    backend::ErrorFields::decode(body).is_ok_and(|f| {
        matches!(f.severity, b"FATAL" | b"PANIC")
            || matches!(f.code, b"57P01" | b"57P02" | b"57P03")
    })
}

/// The client closed its side: fine between messages, a protocol error inside one.
/// While the proxy shuts down, it is `SHUTDOWN` waking an idle session: the
/// client is told why its connection ends (SQLSTATE 57P01, as PostgreSQL
/// does), after whatever replies are still due.
fn client_eof(cbuf: &BytesMut, shared: &Shared, cout: &mut BytesMut) -> Result<()> {
    if shared.is_stopping() {
        Error::ShuttingDown.encode(cout);
        return Ok(());
    }
    if cbuf.is_empty() {
        Ok(())
    } else {
        Err(Error::Truncated)
    }
}

/// Writes what it can of `buf` with one `send` and drops the written bytes.
/// (`write_buf` would use `writev`, which costs the kernel more per call.)
/// Cancel-safe: the write and the advance happen in the same poll.
async fn write_some<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    let n = w.write(&buf[..]).await?;
    buf.advance(n);
    buffers::rewind(buf);
    Ok(n)
}

/// Sends what the socket takes of `buf` now and drops the sent bytes; a full
/// socket is not an error (the event loop waits for it to drain). Returns
/// the bytes sent.
fn try_write(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    match stream.try_write(&buf[..]) {
        Ok(n) => {
            buf.advance(n);
            buffers::rewind(buf);
            Ok(n)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// Whether a client message goes to the server unchanged, owing one plain
/// reply (when there is no shard map): a simple Query, a Parse or Bind of
/// the unnamed statement, a portal's Describe, an Execute, a Sync. (See
/// [`Session::plain_entry`].)
fn is_plain(tag: u8, body: &[u8]) -> Result<bool> {
    Ok(match tag {
        frontend::QUERY => true,
        frontend::PARSE => body.first() == Some(&0),
        frontend::BIND => Bind::decode(body)?.statement.is_empty(),
        frontend::DESCRIBE => Target::decode(body)?.kind == frontend::TARGET_PORTAL,
        frontend::EXECUTE | frontend::SYNC => true,
        _ => false,
    })
}

/// Adds a reply frame to the cache fill in progress, if any; stores the
/// reply at its ReadyForQuery. Anything but a plain result (an error, a
/// notice, ...) abandons the fill.
fn fill_with(fill: &mut Option<Box<Fill>>, cache: Option<&ResultCache>, tag: u8, frame: &[u8]) {
    let (Some(f), Some(cache)) = (fill.as_mut(), cache) else {
        return;
    };
    match tag {
        backend::BIND_COMPLETE
        | backend::ROW_DESCRIPTION
        | backend::NO_DATA
        | backend::DATA_ROW
        | backend::COMMAND_COMPLETE
            if !f.complete && f.reply.len() + frame.len() <= cache.config().entry_bytes_max =>
        {
            f.reply.extend_from_slice(frame);
            f.complete = tag == backend::COMMAND_COMPLETE;
        }
        backend::READY_FOR_QUERY if f.complete => {
            let f = fill.take().expect("matched above");
            cache
                .store
                .insert(&f.identity, f.reply.into(), f.ticket, f.origin);
        }
        _ => *fill = None,
    }
}

/// A request in flight: from the client's first message of it to the
/// ReadyForQuery that ends it (a simple Query, or an extended-protocol
/// batch up to its Sync, with whatever the client pipelined meanwhile).
struct InFlight {
    /// By `Shared::clock`.
    started_us: u64,
    /// The client has sent the Sync or Query that ends it: what it sends
    /// next is another request.
    closed: bool,
    /// An ErrorResponse reached the client.
    failed: bool,
    /// Answered from the cache; the shard it holds the row of.
    cache_hit: Option<u32>,
    /// Ran on several shards.
    multi: bool,
    /// With DEBUG logging: the statement's span, with its SQL.
    span: Option<tracing::Span>,
}

/// A client's named prepared statement.
struct ClientStatement {
    /// Content hash; the server-side name is `sl_<hash>`.
    hash: u64,
    /// The Parse body after the name: query, parameter types.
    definition: Bytes,
    effects: Option<Effects>,
}

#[repr(C)]
pub struct Session {
    // Hot first: what a transaction on the plain path touches, in a few
    // cache lines (`repr(C)` keeps this order); the rest after.
    /// First, so that it goes before the socket closes (see
    /// [`crate::clients::ClientInfo`]): the client's entry in `SHOW
    /// CLIENTS`, and the counters `SHOW STATS` sums.
    registration: crate::clients::Registration,
    shared: Arc<Shared>,
    client: TcpStream,
    cbuf: BytesMut,
    cout: BytesMut,
    sout: BytesMut,
    server: Option<Pooled>,
    pending: Pending,
    /// The pool the next server connection comes from.
    pool: Arc<Pool>,
    in_flight: Option<InFlight>,
    /// Requests the client pipelined behind the one in flight, oldest
    /// first (at most `PIPELINED_MAX`; later ones join the last).
    queued: std::collections::VecDeque<InFlight>,
    /// Session effects of statements completed in the current transaction.
    txn_effects: Vec<SessionEffect>,
    /// What this transaction's writes invalidate in the cache when it ends.
    cache_writes: Invalidations,
    /// A read sent to a replica (a Query, or a Bind or Describe and the rest
    /// of its batch), kept until its first row reaches the client, so it
    /// can be sent elsewhere if the replica fails.
    retry: Option<Retry>,
    /// An extended-protocol statement that runs on several shards, collected
    /// until its Sync.
    multi_batch: Option<Box<routing::MultiBatch>>,
    /// A cache miss whose reply is being read from the primary.
    fill: Option<Box<Fill>>,
    unnamed_effects: Option<Effects>,
    bound_effects: Option<Effects>,
    /// Bytes of a large client frame still to pass to the server.
    client_stream: usize,
    /// Bytes of a large server frame still to pass to the client.
    server_stream: usize,
    /// When the client's transaction began, by `Shared::clock`.
    xact_start_us: u64,
    /// The clock as read in this turn of the event loop, if it was (see
    /// [`Session::now_us`]).
    turn_us: Option<u64>,
    /// The latency histogram of the last request's route (looked up again
    /// only when the route changes).
    route_histogram: Option<(Route, Arc<LatencyHistogram>)>,
    /// The database's SLO window, when it has objectives.
    slo: Option<Arc<SloWindow>>,
    /// The shard of the attached server connection (`None` without a shard map).
    server_shard: Option<ShardId>,
    /// The server of the attached connection, counted as outstanding on it
    /// (`None` without a shard map).
    server_hold: Option<Hold>,
    /// Counts server connections attached, so that per-connection facts
    /// (the unnamed statement is there) can tell which connection they hold for.
    attach_count: u64,
    /// A BEGIN answered locally; sent ahead of the transaction's first
    /// statement, once that statement has chosen the shard.
    deferred_begin: Option<Bytes>,
    /// Session parameters the client wants, and those it logged in with.
    params: ParamState,
    /// Times the read being sent again has been sent before.
    retry_attempts: u32,
    mode: PoolMode,
    txn_status: TransactionStatus,
    params_dirty: bool,
    /// A proxy error ended an extended-protocol batch: skip to Sync.
    skipping_to_sync: bool,
    terminated: bool,
    /// `SHUTDOWN` closed the client's read side while a request was on its
    /// way: the session ends once it is answered.
    client_shut: bool,
    /// `in_transaction` as last published for `SHUTDOWN`.
    published_in_transaction: bool,
    error_in_batch: bool,
    /// A statement that may write ran in this transaction.
    txn_wrote: bool,
    /// A statement was refused inside a transaction: like PostgreSQL, the
    /// transaction is aborted until the client ends it.
    aborted_locally: bool,
    /// The statement being attached may write (it is not replica-safe).
    statement_writes: bool,
    /// The BEGIN held back in `deferred_begin` is READ ONLY, so the
    /// transaction may run on a replica.
    begin_read_only: bool,

    // Cold: routing, replicas, named statements, parameters.
    /// The pool of the database's configured server.
    home_pool: Arc<Pool>,
    database: String,
    user: Arc<crate::config::User>,
    /// Pools of the shard map's servers, by address.
    shard_pools: HashMap<String, Arc<Pool>>,
    /// Where reads go (`SET shardline.read_from`).
    read_from: ReadFrom,
    /// Per shard, the session's last write: its reads go only to replicas
    /// that have replayed it.
    last_writes: HashMap<ShardId, WriteMark>,
    /// The reply so far to the read in `retry` (what precedes its rows).
    held_reply: BytesMut,
    /// The client's unnamed statement while routing defers it to its Bind,
    /// and the attachment it was last sent on.
    unnamed: Option<ClientStatement>,
    unnamed_sent_on: Option<u64>,
    /// `SET shardline.shard = N`: run everything on this shard.
    forced_shard: Option<ShardId>,
    /// The unnamed portal is a BEGIN/COMMIT/ROLLBACK answered locally, with this tag.
    local_portal: Option<&'static str>,
    statements: HashMap<Bytes, ClientStatement>,
    startup_params: ParamState,
    /// The statement being routed is a point read the cache may answer.
    point_read: Option<PointRead>,
}

/// What a session knows of its last write on a shard.
#[derive(Clone, Copy, Debug)]
enum WriteMark {
    /// Committed before this instant; the LSN is not known yet.
    CommittedBefore(tokio::time::Instant),
    /// A primary WAL position at or past the commit.
    Lsn(u64),
}

/// A read that may be sent again: nothing of its reply has reached the client.
struct Retry {
    /// The client's messages: a Query, or a Bind and what followed it up to
    /// its Sync.
    frames: Vec<Frame>,
    /// The Sync (or the Query) is among `frames`.
    complete: bool,
    shard: ShardId,
    attempts: u32,
}

/// Times a read is sent again after its server failed.
const READ_RETRIES_MAX: u32 = 3;

pub struct Login {
    pub registration: crate::clients::Registration,
    pub client: TcpStream,
    pub cbuf: BytesMut,
    pub pool: Arc<Pool>,
    pub startup_params: ParamState,
    /// The database and user the client logged in as.
    pub database: String,
    pub user: Arc<crate::config::User>,
}

impl Session {
    pub fn new(shared: Arc<Shared>, login: Login) -> Session {
        let mode = login.pool.mode;
        let read_from = shared.config.replicas.read_from;
        let slo = shared.statements.slo(&login.database);
        let now = shared.clock.now_us();
        Session {
            registration: login.registration,
            shared,
            client: login.client,
            cbuf: buffers::unshared(&login.cbuf),
            cout: BytesMut::with_capacity(buffers::BUFFER_BYTES),
            home_pool: login.pool.clone(),
            pool: login.pool,
            database: login.database,
            user: login.user,
            shard_pools: HashMap::new(),
            server_shard: None,
            server_hold: None,
            read_from,
            begin_read_only: false,
            statement_writes: true,
            txn_wrote: false,
            last_writes: HashMap::new(),
            retry: None,
            held_reply: BytesMut::new(),
            retry_attempts: 0,
            attach_count: 0,
            unnamed: None,
            unnamed_sent_on: None,
            deferred_begin: None,
            aborted_locally: false,
            forced_shard: None,
            local_portal: None,
            multi_batch: None,
            mode,
            server: None,
            sout: BytesMut::with_capacity(buffers::BUFFER_BYTES),
            pending: Pending::default(),
            statements: HashMap::new(),
            unnamed_effects: None,
            bound_effects: None,
            params: login.startup_params.clone(),
            startup_params: login.startup_params,
            params_dirty: false,
            txn_effects: Vec::new(),
            error_in_batch: false,
            txn_status: TransactionStatus::Idle,
            client_stream: 0,
            server_stream: 0,
            skipping_to_sync: false,
            terminated: false,
            point_read: None,
            fill: None,
            cache_writes: Invalidations::default(),
            in_flight: None,
            client_shut: false,
            queued: std::collections::VecDeque::new(),
            route_histogram: None,
            slo,
            xact_start_us: now,
            turn_us: None,
            published_in_transaction: false,
        }
    }

    /// Serves the client until it terminates or an error ends the session.
    pub async fn run(mut self) -> Result<()> {
        // The loop is here rather than in a function of its own: each
        // nested future is one more state to look at in every wakeup.
        let buffer_max = self.shared.config.proxy.buffer_bytes_max as usize;
        let result = loop {
            match self.step(buffer_max).await {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e @ Error::ServerIo(_)) if self.retry.is_some() => {
                    if let Err(e) = cold(self.retry_read(e)).await {
                        break Err(e);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        if let Err(e) = &result {
            if !matches!(e, Error::ClientIo(_)) {
                // After whatever replies are already due; `finish` writes them out.
                self.send_error(e);
            }
        }
        cold(self.finish()).await;
        result
    }

    /// One turn of the event loop; `true` once the client is gone.
    async fn step(&mut self, buffer_max: usize) -> Result<bool> {
        self.turn_us = None;
        self.process_client().await?;
        if self.terminated {
            return Ok(true);
        }
        self.process_server()?;
        self.write_ready()?;
        if self.client_shut
            && (self.server.is_none() || (self.pending.is_empty() && self.in_flight.is_none()))
        {
            // SHUTDOWN closed the client's read side while a request was on
            // its way: it has its reply now (or has no server to get one).
            Error::ShuttingDown.encode(&mut self.cout);
            return Ok(true);
        }

        // A request on its way when SHUTDOWN closes the client's read side
        // is finished first, so the client learns whether it committed.
        let busy = self.in_flight.is_some() || !self.pending.is_empty();
        // Back-pressure: read a side only while the other side's output has room.
        let (mut received, mut sent) = (0, 0);
        let Session {
            client,
            cbuf,
            cout,
            server,
            sout,
            shared,
            client_shut,
            ..
        } = self;
        let (mut client_rd, mut client_wr) = client.split();
        let read_client = cout.len() < buffer_max && sout.len() < buffer_max && !*client_shut;
        let read_server = cout.len() < buffer_max;
        buffers::make_room(cbuf);
        match server.as_deref_mut() {
            Some(conn) => {
                buffers::make_room(&mut conn.buf);
                let (mut server_rd, mut server_wr) = conn.stream.split();
                tokio::select! {
                    biased;
                    r = write_some(&mut server_wr, sout), if !sout.is_empty() => {
                        r.map_err(|e| { conn.broken = true; Error::ServerIo(e) })?;
                    }
                    r = write_some(&mut client_wr, cout), if !cout.is_empty() => {
                        sent = r.map_err(Error::ClientIo)?;
                    }
                    r = server_rd.read_buf(&mut conn.buf), if read_server => {
                        let n = r.map_err(|e| { conn.broken = true; Error::ServerIo(e) })?;
                        if n == 0 {
                            conn.broken = true;
                            return Err(Error::ServerIo(std::io::ErrorKind::UnexpectedEof.into()));
                        }
                    }
                    r = client_rd.read_buf(cbuf), if read_client => {
                        received = r.map_err(Error::ClientIo)?;
                        if received == 0 {
                            if busy && shared.is_stopping() {
                                *client_shut = true;
                            } else {
                                return client_eof(cbuf, shared, cout).map(|()| true);
                            }
                        }
                    }
                }
            }
            None => {
                tokio::select! {
                    biased;
                    r = write_some(&mut client_wr, cout), if !cout.is_empty() => {
                        sent = r.map_err(Error::ClientIo)?;
                    }
                    r = client_rd.read_buf(cbuf), if read_client => {
                        received = r.map_err(Error::ClientIo)?;
                        if received == 0 {
                            return client_eof(cbuf, shared, cout).map(|()| true);
                        }
                    }
                }
            }
        }
        if sent > 0 {
            self.registration.info().counters.add_sent(sent);
        }
        if received > 0 {
            self.on_request_bytes(received);
        }
        Ok(false)
    }

    /// Bytes from the client, counted. (Requests are timed from their first
    /// message: `timing.rs`.)
    #[inline]
    fn on_request_bytes(&mut self, n: usize) {
        self.registration.info().counters.add_received(n);
    }

    /// `Shared::clock` now, read once per turn of the event loop: the
    /// request a turn starts and the server connection it takes, or the
    /// reply it forwards and the connection it gives back, share one
    /// reading (a clock read costs about as much as the rest of a turn's
    /// bookkeeping). A turn never waits without forgetting it.
    #[inline]
    pub(super) fn now_us(&mut self) -> u64 {
        *self
            .turn_us
            .get_or_insert_with(|| self.shared.clock.now_us())
    }

    /// A request ended at `now` after `query_us`, its ReadyForQuery saying
    /// `status`: a query for `SHOW STATS`, and a transaction if idle.
    #[inline]
    fn count_query(&mut self, status: TransactionStatus, now: u64, query_us: u64) {
        let xact_us = (status == TransactionStatus::Idle).then(|| {
            let us = now.saturating_sub(self.xact_start_us);
            self.xact_start_us = now;
            us
        });
        self.registration
            .info()
            .counters
            .add_query(query_us, xact_us);
    }

    /// Tells `SHUTDOWN` (and `SHOW CLIENTS`) whether the client is inside a
    /// transaction that holds no server connection (a BEGIN answered
    /// locally), so it is not taken for idle. Stores only on a change.
    pub(crate) fn publish_in_transaction(&mut self, open: bool) {
        if self.published_in_transaction != open {
            self.published_in_transaction = open;
            let info = self.registration.info();
            info.in_transaction
                .store(open, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Writes what the sockets take right now, without waiting. A reply or a
    /// request usually fits in the socket buffer at once, so most turns of
    /// the loop need no writable wakeup and no extra pass through `select!`.
    fn write_ready(&mut self) -> Result<()> {
        if let Some(conn) = self.server.as_deref_mut() {
            if !self.sout.is_empty() {
                if let Err(e) = try_write(&conn.stream, &mut self.sout) {
                    conn.broken = true;
                    return Err(Error::ServerIo(e));
                }
            }
        }
        // Back to the pool before the client sees its reply: whoever it
        // then tells (or a metrics scrape) finds the connection free.
        self.maybe_release();
        if !self.cout.is_empty() {
            let sent = try_write(&self.client, &mut self.cout).map_err(Error::ClientIo)?;
            self.registration.info().counters.add_sent(sent);
        }
        Ok(())
    }

    /// Gives up the chance to send the read in flight elsewhere: what is held
    /// of its reply goes to the client.
    fn keep_read(&mut self) {
        keep_read(&mut self.retry, &mut self.held_reply, &mut self.cout);
    }

    /// The replica running a read failed before any of its reply reached the
    /// client: take it out of rotation and send the read elsewhere.
    async fn retry_read(&mut self, e: Error) -> Result<()> {
        let retry = self.retry.take().expect("checked by the caller");
        self.fill = None;
        if retry.attempts >= READ_RETRIES_MAX || self.routing_map().is_none() {
            return Err(e);
        }
        if let Some(hold) = &self.server_hold {
            let reason = e.to_string();
            hold.node()
                .report_failure(&reason, &self.shared.config.replicas);
            tracing::info!(shard = %retry.shard, addr = %hold.node().addr, %reason, "sending a read to another server");
        }
        self.drop_server();
        self.sout.clear();
        self.held_reply.clear();
        // The client's messages again, as if just received: the failed
        // server is out of rotation, so they go elsewhere.
        self.retry_attempts = retry.attempts + 1;
        let mut result = Ok(());
        for frame in retry.frames {
            result = Box::pin(self.on_client_frame(frame)).await;
            self.turn_us = None;
            if result.is_err() {
                break;
            }
        }
        self.retry_attempts = 0;
        result
    }

    /// Hands the server connection back, or drops it if its state is unknown.
    async fn finish(&mut self) {
        // A client that stopped reading does not hold the session open.
        let flush = self.client.write_all(&self.cout);
        if let Ok(Ok(())) = tokio::time::timeout(std::time::Duration::from_secs(5), flush).await {
            self.registration.info().counters.add_sent(self.cout.len());
        }
        let Some(mut conn) = self.server.take() else {
            return;
        };
        let clean = self.at_boundary() && conn.buf.is_empty();
        if !clean {
            conn.broken = true;
        } else if self.mode == PoolMode::Session {
            let max = self.shared.config.proxy.message_bytes_max;
            let _ = conn.run_discarding("DISCARD ALL", max).await;
            conn.params = ParamState::default();
            conn.prepared.clear();
        }
    }

    fn maybe_release(&mut self) {
        if self.mode != PoolMode::Transaction {
            return;
        }
        if self.server.is_none() {
            return;
        }
        if self.pending.can_sync_early() && !self.server_in_transaction() {
            // Free the connection once our own Sync is answered (swallowed).
            self.sync_early();
            return;
        }
        if self.at_boundary() && self.sout.is_empty() {
            self.release_server();
        }
    }

    /// Applies what the writes of the transaction that just ended (or
    /// whose connection was lost: it may have committed) invalidate.
    fn apply_cache_writes(&mut self) {
        if self.cache_writes.is_empty() {
            return;
        }
        if let Some(cache) = &self.shared.cache {
            cache.apply(&mut self.cache_writes);
        }
    }

    /// Hands the server connection back to its pool.
    fn release_server(&mut self) {
        self.apply_cache_writes();
        if let Some(mut conn) = self.server.take() {
            if !conn.buf.is_empty() {
                // Bytes nobody asked for: the connection is out of step.
                conn.broken = true;
            }
            conn.release(self.now_us());
        }
        self.server_shard = None;
        self.server_hold = None;
    }

    /// Closes the attached server connection (its state is unknown, or
    /// rolling back is the point) and forgets what was owed from it.
    fn drop_server(&mut self) {
        self.apply_cache_writes();
        self.fill = None;
        if let Some(mut conn) = self.server.take() {
            conn.broken = true;
        }
        self.pending.clear();
        self.server_shard = None;
        self.server_hold = None;
    }

    /// Whether the attached server connection is inside the client's
    /// transaction (a deferred BEGIN has not reached any server yet).
    fn server_in_transaction(&self) -> bool {
        self.txn_status != TransactionStatus::Idle && self.deferred_begin.is_none()
    }

    /// Whether the server connection is between transactions with nothing in
    /// flight in either direction: the only state in which it may be reused.
    fn at_boundary(&self) -> bool {
        self.pending.is_idle()
            && !self.server_in_transaction()
            && self.server_stream == 0
            && self.client_stream == 0
    }

    /// Makes sure a server connection is attached, with the client's parameters.
    async fn ensure_server(&mut self) -> Result<()> {
        if self.server.is_none() {
            let conn = self.pool.checkout(self.borrower()).await?;
            self.attach_conn(conn);
        }
        if self.params_dirty && self.pending.is_idle() {
            self.params_dirty = false;
            let conn = self.server.as_mut().expect("attached above");
            let sql = params::sync_sql(&self.params, &conn.params);
            if !sql.is_empty() {
                let max = self.shared.config.proxy.message_bytes_max;
                match conn.run_discarding(&sql, max).await {
                    Ok(None) => {}
                    Ok(Some(message)) => {
                        tracing::warn!(%message, "replaying session parameters failed")
                    }
                    Err(e) => {
                        self.server = None;
                        return Err(e);
                    }
                }
            }
            // Shared from now on, so the next comparison is by pointer.
            conn.params = self.params.clone();
        }
        Ok(())
    }

    fn borrower(&self) -> Borrower<'_> {
        Borrower {
            client: Some(self.registration.info()),
            in_transaction: self.txn_status != TransactionStatus::Idle,
        }
    }

    fn attach_conn(&mut self, conn: Pooled) {
        self.server = Some(conn);
        self.attach_count += 1;
        self.params_dirty = true;
    }

    /// What [`Session::ensure_server`] does when it need not wait: attaches
    /// an idle connection whose parameters are the client's already.
    /// `false`: nothing attached, or attached with parameters to replay
    /// (left to `ensure_server`).
    fn attach_at_once(&mut self) -> bool {
        let now = self.now_us();
        let Some(conn) = self.pool.try_checkout(self.borrower(), now) else {
            return false;
        };
        self.attach_conn(conn);
        let conn = self.server.as_deref_mut().expect("attached above");
        if !self.pending.is_idle() || !params::sync_sql(&self.params, &conn.params).is_empty() {
            return false;
        }
        conn.params = self.params.clone();
        self.params_dirty = false;
        true
    }

    /// Sends a deferred BEGIN to the attached server, ahead of the
    /// transaction's first statement; its reply was given already.
    fn start_deferred_transaction(&mut self) {
        if let Some(begin) = self.deferred_begin.take() {
            self.sout.extend_from_slice(&begin);
            self.push_injected(Expect::Ready);
            // A simple Query ends the unnamed statement on the server.
            self.unnamed_sent_on = None;
        }
    }

    /// Reports a non-fatal error for the message with `tag`: the client
    /// learns at once, an extended batch skips to its Sync, and an error
    /// inside a transaction aborts it as a PostgreSQL error would.
    fn report(&mut self, e: Error, tag: u8) -> Result<()> {
        if e.is_fatal() {
            return Err(e);
        }
        self.keep_read();
        if self.txn_status != TransactionStatus::Idle {
            // Any failed statement aborts the transaction, as in PostgreSQL:
            // a pool that stayed exhausted or paused must not let the
            // client COMMIT the statements around the one that failed.
            self.aborted_locally = true;
            self.txn_status = TransactionStatus::Failed;
        }
        self.send_error(&e);
        if tag == frontend::QUERY || tag == frontend::SYNC {
            self.ready_for_query(self.txn_status);
        } else {
            self.skipping_to_sync = true;
        }
        Ok(())
    }

    /// Queues the reply to a message the proxy sent itself (not forwarded).
    fn push_injected(&mut self, expect: Expect) {
        self.pending.push(
            Entry::Injected {
                expect,
                registers: None,
            },
            &mut self.cout,
        );
    }

    /// Sends a Sync of the proxy's own, ending a batch that only touched
    /// named statements so the connection can be freed.
    fn sync_early(&mut self) {
        frontend::encode_sync(&mut self.sout);
        self.push_injected(Expect::Ready);
    }

    fn conn(&mut self) -> &mut crate::server::ServerConn {
        self.server.as_mut().expect("ensure_server ran")
    }

    async fn process_client(&mut self) -> Result<()> {
        let proxy = &self.shared.config.proxy;
        let buffer_max = proxy.buffer_bytes_max as usize;
        let message_max = proxy.message_bytes_max as usize;
        loop {
            if self.client_stream > 0 {
                let n = self.client_stream.min(self.cbuf.len());
                if n == 0 {
                    return Ok(());
                }
                // CopyData outside a COPY is ignored, as PostgreSQL does.
                if self.server.is_some() {
                    self.sout.extend_from_slice(&self.cbuf[..n]);
                }
                self.cbuf.advance(n);
                self.client_stream -= n;
                continue;
            }
            if self.sout.len() >= buffer_max || self.terminated {
                return Ok(());
            }
            let Some(header) = Header::peek(&self.cbuf, FRAME_BYTES_MAX)? else {
                return Ok(());
            };
            let frame_len = header.frame_len();
            if header.tag == frontend::COPY_DATA && frame_len > STREAM_THRESHOLD {
                self.client_stream = frame_len;
                continue;
            }
            if frame_len - wire::HEADER_LEN > message_max {
                return Err(wire::Error::TooLarge {
                    len: frame_len as u64 - 1,
                    max: message_max as u64 + 4,
                }
                .into());
            }
            if self.cbuf.len() >= frame_len {
                let run = self.pass_plain(header.tag, frame_len, buffer_max, message_max)?;
                if run > 0 {
                    self.cbuf.advance(run);
                    continue;
                }
            }
            let Some(frame) = Frame::decode(&mut self.cbuf, FRAME_BYTES_MAX)? else {
                return Ok(());
            };
            cold(self.on_client_frame(frame)).await?;
            // It may have waited (for a server connection, say).
            self.turn_us = None;
        }
    }

    /// Client messages that run on a server unchanged, owing one plain reply
    /// each (see [`is_plain`]), handled in place in the client's buffer:
    /// what [`Session::on_client_frame`] does for them when there is no
    /// shard map (so no routing, no read held for a retry) and nothing else
    /// is going on, without splitting frames off the buffer or entering the
    /// async path. A Query or Parse that starts a transaction attaches an
    /// idle connection if one is at hand. Takes the run of such messages
    /// that starts with the one of `tag` and `frame_len` (a Parse, Bind,
    /// Describe, Execute and Sync usually arrive together), copying it to
    /// the server's buffer at once; returns its length. 0 leaves the first
    /// message to that path.
    #[inline]
    fn pass_plain(
        &mut self,
        tag: u8,
        frame_len: usize,
        buffer_max: usize,
        message_max: usize,
    ) -> Result<usize> {
        if self.shared.follower.is_some()
            || self.retry.is_some()
            || self.retry_attempts != 0
            || self.skipping_to_sync
            || self.multi_batch.is_some()
            || self.pending.is_skipping()
        {
            return Ok(0);
        }
        // Out of `self` while the messages are read from it (an empty
        // BytesMut stands in: no allocation).
        let cbuf = std::mem::take(&mut self.cbuf);
        let mut next = (tag, frame_len);
        let mut end = 0;
        let passed = loop {
            let (tag, len) = next;
            match self.pass_plain_frame(tag, &cbuf[end..end + len]) {
                Ok(true) => end += len,
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
            }
            // The next message joins the run if it is whole and within the
            // limits `process_client` checks (which reports any breach).
            let Ok(Some(header)) = Header::peek(&cbuf[end..], FRAME_BYTES_MAX) else {
                break Ok(());
            };
            let len = header.frame_len();
            if cbuf.len() - end < len
                || len - wire::HEADER_LEN > message_max
                || self.sout.len() + end >= buffer_max
            {
                break Ok(());
            }
            next = (header.tag, len);
        };
        self.sout.extend_from_slice(&cbuf[..end]);
        self.cbuf = cbuf;
        passed.map(|()| end)
    }

    /// One message of [`Session::pass_plain`]'s run, whose caller copies
    /// it to the server's buffer; `false`: not plain, the run ends before it.
    fn pass_plain_frame(&mut self, tag: u8, frame: &[u8]) -> Result<bool> {
        let body = &frame[wire::HEADER_LEN..];
        if !is_plain(tag, body)? {
            return Ok(false);
        }
        if self.server.is_none() {
            let starts = matches!(tag, frontend::QUERY | frontend::PARSE);
            if !starts || !self.attach_at_once() {
                return Ok(false);
            }
        }
        if self.params_dirty {
            return Ok(false);
        }
        self.track_request(tag, body);
        let entry = self.plain_entry(tag, body)?;
        self.pending.push(entry, &mut self.cout);
        Ok(true)
    }

    /// The reply a message [`is_plain`] finds plain is owed, noted as
    /// both paths (`pass_plain` and `on_client_frame`) do.
    fn plain_entry(&mut self, tag: u8, body: &[u8]) -> Result<Entry> {
        Ok(match tag {
            frontend::QUERY => {
                let effects = self.effects_of(frontend::query_text(body)?);
                Entry::with_effects(Expect::Ready, effects)
            }
            frontend::PARSE => {
                self.pending.note_open(); // the unnamed statement lives until the Sync
                self.unnamed_effects = self.statement_effects_of(Parse::decode(body)?.query);
                Entry::forwarded(Expect::ParseComplete)
            }
            frontend::BIND => {
                self.pending.note_open(); // a portal
                self.bound_effects = self.unnamed_effects.clone();
                Entry::forwarded(Expect::BindComplete)
            }
            frontend::DESCRIBE => {
                self.pending.note_open();
                Entry::forwarded(Expect::Description)
            }
            frontend::EXECUTE => {
                self.pending.note_open();
                let effects = self.bound_effects.take();
                Entry::with_effects(Expect::ExecuteDone, effects)
            }
            _ => Entry::forwarded(Expect::Ready),
        })
    }

    async fn on_client_frame(&mut self, frame: Frame) -> Result<()> {
        let tag = frame.tag();
        if self.retry_attempts == 0 {
            // (A read sent again is the same request.)
            self.track_request(tag, frame.body());
        }
        // A read may be sent again only while it is the only thing in
        // flight: anything behind it would be lost or answered out of order.
        // The rest of its own extended-protocol batch joins it.
        match &mut self.retry {
            Some(retry)
                if !retry.complete
                    && matches!(
                        tag,
                        frontend::DESCRIBE | frontend::EXECUTE | frontend::FLUSH | frontend::SYNC
                    ) =>
            {
                retry.frames.push(frame.clone());
                retry.complete = tag == frontend::SYNC;
            }
            Some(_) => self.keep_read(),
            None => {}
        }
        if self.skipping_to_sync {
            if tag == frontend::SYNC {
                self.skipping_to_sync = false;
                self.ready_for_query(self.txn_status);
            }
            return Ok(());
        }
        if self.pending.is_skipping() && matches!(tag, frontend::QUERY | frontend::FUNCTION_CALL) {
            // After an error in an extended-protocol batch PostgreSQL ignores
            // everything up to the Sync, a Query too: so does the proxy,
            // which would otherwise wait for a reply that never comes.
            return Ok(());
        }
        if self.multi_batch.is_some() {
            // `false`: the batch ran, and this frame is handled as usual.
            if self.on_multi_batch_frame(&frame).await? {
                return Ok(());
            }
        }
        if let Err(e) = self.check_map_current(&frame) {
            // Before anything reaches a server: the statement is not run.
            self.send_error(&e);
            if tag == frontend::QUERY {
                self.ready_for_query(self.txn_status);
            } else {
                self.skipping_to_sync = true;
            }
            return Ok(());
        }
        // COPY data and Flush never choose a shard: spare them the map.
        let map = match tag {
            frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL | frontend::FLUSH => {
                None
            }
            _ => self.routing_map(),
        };
        if let Some(map) = &map {
            if self.route_frame(&frame, map).await? {
                return Ok(());
            }
        }
        // Messages answered without a server when none is attached.
        if self.server.is_none() {
            match tag {
                frontend::TERMINATE => {
                    self.terminated = true;
                    return Ok(());
                }
                frontend::FLUSH
                | frontend::COPY_DATA
                | frontend::COPY_DONE
                | frontend::COPY_FAIL => return Ok(()),
                frontend::SYNC => {
                    self.ready_for_query(self.txn_status);
                    return Ok(());
                }
                frontend::CLOSE => {
                    let target = Target::decode(frame.body())?;
                    if target.kind == frontend::TARGET_STATEMENT && !target.name.is_empty() {
                        self.statements.remove(target.name);
                        backend::encode_close_complete(&mut self.cout);
                        return Ok(());
                    }
                }
                // A named Parse that parses is answered at once and prepared on
                // the server when first used. Clients that prepare synchronously
                // while others of theirs hold every server connection (pgbench
                // -M prepared, libpq's PQprepare) would otherwise wait on
                // themselves until the checkout timeout.
                // (A named one: the unnamed statement is left to `on_parse`.)
                frontend::PARSE if frame.body().first().is_some_and(|&b| b != 0) => {
                    let parse = Parse::decode(frame.body())?;
                    let sql = std::str::from_utf8(parse.query).ok();
                    if sql.is_some_and(router::parses) {
                        self.remember(&frame, parse)?;
                        backend::encode_parse_complete(&mut self.cout);
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
        if tag == frontend::TERMINATE {
            self.terminated = true;
            return Ok(());
        }
        let attached = match &map {
            Some(map) if tag == frontend::FUNCTION_CALL => self.attach_function_call(map).await,
            Some(map) => self.attach_current(map).await,
            // Attached and in step: nothing to wait for.
            None if self.server.is_some() && !self.params_dirty => Ok(()),
            None => self.ensure_server().await,
        };
        if let Err(e) = attached {
            return self.report(e, tag);
        }
        let routed_describe =
            tag == frontend::DESCRIBE && map.is_some() && self.mode == PoolMode::Transaction;
        if routed_describe
            && Target::decode(frame.body()).is_ok_and(|t| t.kind == frontend::TARGET_STATEMENT)
        {
            // Describing a prepared statement runs nothing: on a replica that
            // fails, it can be asked again elsewhere.
            let read = (self.txn_status == TransactionStatus::Idle).then_some(self.read_from);
            let shard = self.server_shard.unwrap_or(router::ShardMap::HOME);
            self.arm_retry(read, shard, &frame, false);
        }
        match tag {
            frontend::QUERY => {
                let entry = self.plain_entry(tag, frame.body())?;
                self.forward(&frame, entry);
            }
            frontend::PARSE => self.on_parse(&frame)?,
            frontend::BIND => self.on_bind(&frame)?,
            frontend::DESCRIBE => {
                let target = Target::decode(frame.body())?;
                if target.kind == frontend::TARGET_PORTAL {
                    let entry = self.plain_entry(tag, frame.body())?;
                    self.forward(&frame, entry);
                    return Ok(());
                }
                // A deferred unnamed statement can be sent again, so describing
                // it does not pin the batch to this connection.
                if target.name.is_empty() && self.unnamed.is_none() {
                    self.pending.note_open();
                }
                if target.kind == frontend::TARGET_STATEMENT && target.name.is_empty() {
                    self.send_unnamed();
                }
                let entry = Entry::forwarded(Expect::Description);
                match self.prepare_named(target.kind, target.name) {
                    Some(name) => {
                        frontend::encode_target(
                            &mut self.sout,
                            frontend::DESCRIBE,
                            target.kind,
                            &name,
                        );
                        self.pending.push(entry, &mut self.cout);
                    }
                    None => self.forward(&frame, entry),
                }
            }
            frontend::EXECUTE | frontend::SYNC => {
                let entry = self.plain_entry(tag, frame.body())?;
                self.forward(&frame, entry);
            }
            frontend::CLOSE => {
                let target = Target::decode(frame.body())?;
                if target.kind == frontend::TARGET_STATEMENT && !target.name.is_empty() {
                    // Server-side statements are shared and kept; the client's name goes.
                    self.statements.remove(target.name);
                    self.pending
                        .push(Entry::Local(LocalReply::CloseComplete), &mut self.cout);
                } else {
                    self.pending.note_open(); // a portal or the unnamed statement
                    self.forward(&frame, Entry::forwarded(Expect::CloseComplete));
                }
            }
            frontend::FUNCTION_CALL => self.forward(&frame, Entry::forwarded(Expect::Ready)),
            frontend::FLUSH | frontend::COPY_DATA => self.sout.extend_from_slice(frame.as_bytes()),
            frontend::COPY_DONE | frontend::COPY_FAIL => self.forward(&frame, Entry::CopyEnd),
            other => return Err(Error::UnexpectedMessage(other)),
        }
        Ok(())
    }

    /// A proxy whose shard-map lease has lapsed starts no new transaction on a
    /// sharded table (it might route by a map that has moved on). Work inside
    /// a transaction that began while it was current carries on; partitions
    /// that moved meanwhile are protected by the fence on the old owner.
    #[inline]
    fn check_map_current(&self, frame: &Frame) -> Result<()> {
        match &self.shared.follower {
            None => Ok(()),
            Some(follower) => self.check_map_current_of(follower, frame),
        }
    }

    fn check_map_current_of(
        &self,
        follower: &crate::follower::MapFollower,
        frame: &Frame,
    ) -> Result<()> {
        let starts_work = matches!(
            frame.tag(),
            frontend::QUERY | frontend::PARSE | frontend::BIND
        ) && self.txn_status == TransactionStatus::Idle
            && self.pending.is_idle();
        if !starts_work || follower.is_current() {
            return Ok(());
        }
        let map = follower.map();
        if map.tables.is_empty() {
            return Ok(());
        }
        let sql: &[u8] = match frame.tag() {
            frontend::QUERY => frontend::query_text(frame.body())?,
            frontend::PARSE => Parse::decode(frame.body())?.query,
            _ => {
                // A statement prepared while the proxy was current, run now.
                let bind = Bind::decode(frame.body())?;
                match self.statements.get(bind.statement) {
                    Some(statement) => {
                        let definition = &statement.definition[..];
                        let end = definition.iter().position(|&b| b == 0).unwrap_or(0);
                        &statement.definition[..end]
                    }
                    None => return Ok(()), // the unnamed statement was checked at its Parse
                }
            }
        };
        let Some(tables) = std::str::from_utf8(sql)
            .ok()
            .and_then(router::referenced_tables)
        else {
            return Ok(()); // PostgreSQL reports what does not parse
        };
        let sharded = tables.into_iter().find(|t| {
            let name = t.rsplit('.').next().unwrap_or(t);
            map.tables.contains_key(name)
        });
        match sharded {
            Some(table) => Err(Error::MapNotCurrent { table }),
            None => Ok(()),
        }
    }

    fn forward(&mut self, frame: &Frame, entry: Entry) {
        self.sout.extend_from_slice(frame.as_bytes());
        self.pending.push(entry, &mut self.cout);
    }

    /// What the statements of a simple Query's text do to the session.
    fn effects_of(&self, sql: &[u8]) -> Option<Effects> {
        if !router::may_have_session_effects(sql) {
            return None;
        }
        self.parsed_effects(sql)
    }

    /// What the one statement of a Parse's text does to the session.
    fn statement_effects_of(&self, sql: &[u8]) -> Option<Effects> {
        if !router::statement_may_have_session_effects(sql) {
            return None;
        }
        self.parsed_effects(sql)
    }

    fn parsed_effects(&self, sql: &[u8]) -> Option<Effects> {
        let sql = std::str::from_utf8(sql).ok()?;
        let effects = self.shared.effects_cache.get_or_parse(sql);
        (!effects.is_empty()).then_some(effects)
    }

    /// Records a client's named statement; returns its content hash.
    fn remember(&mut self, frame: &Frame, parse: Parse<'_>) -> Result<u64> {
        let max = self.shared.config.proxy.client_prepared_statements_max as usize;
        if self.statements.len() >= max && !self.statements.contains_key(parse.name) {
            return Err(Error::Unsupported(format!(
                "too many prepared statements (client_prepared_statements_max = {max})"
            )));
        }
        let effects = self.statement_effects_of(parse.query);
        let hash = XxHash3_64::oneshot(parse.definition);
        let start = frame.as_bytes().len() - parse.definition.len();
        let name = Bytes::copy_from_slice(parse.name);
        let definition = frame.clone().into_bytes().slice(start..);
        self.statements.insert(
            name,
            ClientStatement {
                hash,
                definition,
                effects,
            },
        );
        Ok(hash)
    }

    fn on_parse(&mut self, frame: &Frame) -> Result<()> {
        if is_plain(frontend::PARSE, frame.body())? {
            let entry = self.plain_entry(frontend::PARSE, frame.body())?;
            self.forward(frame, entry);
            return Ok(());
        }
        let parse = Parse::decode(frame.body())?;
        let hash = self.remember(frame, parse)?;
        if self.conn().prepared.contains(hash) {
            self.pending
                .push(Entry::Local(LocalReply::ParseComplete), &mut self.cout);
        } else {
            let registers = self.register(hash);
            frontend::encode_parse(&mut self.sout, &statement_name(hash), parse.definition);
            self.pending.push(
                Entry::registering(Expect::ParseComplete, registers),
                &mut self.cout,
            );
        }
        Ok(())
    }

    fn on_bind(&mut self, frame: &Frame) -> Result<()> {
        let bind = Bind::decode(frame.body())?;
        if bind.statement.is_empty() {
            let entry = self.plain_entry(frontend::BIND, frame.body())?;
            self.forward(frame, entry);
            return Ok(());
        }
        self.pending.note_open(); // a portal
        let entry = Entry::forwarded(Expect::BindComplete);
        self.bound_effects = self
            .statements
            .get(bind.statement)
            .and_then(|s| s.effects.clone());
        match self.prepare_named(frontend::TARGET_STATEMENT, bind.statement) {
            Some(name) => {
                frontend::encode_bind(&mut self.sout, bind.portal, &name, bind.rest);
                self.pending.push(entry, &mut self.cout);
            }
            None => self.forward(frame, entry),
        }
        Ok(())
    }

    /// For a client's named statement: makes sure the server has it (sending
    /// a Parse of our own if not) and returns its server-side name. `None` for
    /// portals, the unnamed statement and names the client never prepared.
    fn prepare_named(&mut self, kind: u8, name: &[u8]) -> Option<[u8; 19]> {
        if kind != frontend::TARGET_STATEMENT || name.is_empty() {
            return None;
        }
        let statement = self.statements.get(name)?;
        let (hash, definition) = (statement.hash, statement.definition.clone());
        if !self.conn().prepared.contains(hash) {
            let registers = self.register(hash);
            frontend::encode_parse(&mut self.sout, &statement_name(hash), &definition);
            self.pending.push(
                Entry::Injected {
                    expect: Expect::ParseComplete,
                    registers,
                },
                &mut self.cout,
            );
        }
        Some(statement_name(hash))
    }

    /// Records that `hash` is being prepared on the server, closing the
    /// oldest statement there if the per-connection maximum is reached.
    fn register(&mut self, hash: u64) -> Option<u64> {
        if self.pending.is_skipping() {
            return None; // the server will skip this Parse
        }
        if let Some(evicted) = self.conn().prepared.insert(hash) {
            frontend::encode_target(
                &mut self.sout,
                frontend::CLOSE,
                frontend::TARGET_STATEMENT,
                &statement_name(evicted),
            );
            self.push_injected(Expect::CloseComplete);
        }
        Some(hash)
    }

    fn process_server(&mut self) -> Result<()> {
        let buffer_max = self.shared.config.proxy.buffer_bytes_max as usize;
        let message_max = self.shared.config.proxy.message_bytes_max as usize;
        loop {
            // A ReadyForQuery then goes to the client as the proxy's.
            let status_is_proxys = self.status_is_proxys();
            let Some(conn) = self.server.as_deref_mut() else {
                return Ok(());
            };
            if self.server_stream > 0 {
                let n = self.server_stream.min(conn.buf.len());
                if n == 0 {
                    return Ok(());
                }
                self.cout.extend_from_slice(&conn.buf[..n]);
                conn.buf.advance(n);
                self.server_stream -= n;
                continue;
            }
            if self.cout.len() >= buffer_max || conn.buf.len() < wire::HEADER_LEN {
                return Ok(());
            }
            if self.retry.is_none() && self.fill.is_none() {
                // Replies that only pass through (rows, descriptions, plain
                // completions, the ReadyForQuery the client gets as is)
                // leave in one copy per run, not one per message.
                let commands = self.cache_writes.is_empty() && self.txn_effects.is_empty();
                let ready = !status_is_proxys;
                let run = self.pending.pass_through(
                    &conn.buf,
                    commands,
                    ready,
                    message_max.min(STREAM_THRESHOLD - wire::HEADER_LEN),
                    buffer_max - self.cout.len(),
                );
                if run.len > 0 {
                    self.cout.extend_from_slice(&conn.buf[..run.len]);
                    conn.buf.advance(run.len);
                    self.pending.drain_local(&mut self.cout);
                    if let Some(status) = run.ready {
                        // As the message-by-message path below does.
                        let status = TransactionStatus::decode(&[status])?;
                        self.on_ready(status);
                        self.request_answered(status);
                    }
                    continue;
                }
            }
            let header = Header::peek(&conn.buf, FRAME_BYTES_MAX).map_err(|e| {
                conn.broken = true;
                Error::ServerProtocol(e.to_string())
            })?;
            let Some(header) = header else { return Ok(()) };
            let frame_len = header.frame_len();
            if (header.tag == backend::DATA_ROW || header.tag == backend::COPY_DATA)
                && frame_len > STREAM_THRESHOLD
                && self.pending.awaits_server()
            {
                // Rows reach the client from here on: what is held of the
                // reply goes first, and the read can no longer be sent again.
                keep_read(&mut self.retry, &mut self.held_reply, &mut self.cout);
                self.server_stream = frame_len;
                self.fill = None;
                continue;
            }
            if frame_len - wire::HEADER_LEN > message_max {
                conn.broken = true;
                return Err(Error::ServerProtocol(format!(
                    "message of {frame_len} bytes exceeds message_bytes_max"
                )));
            }
            if conn.buf.len() < frame_len {
                conn.buf.reserve(frame_len - conn.buf.len());
                return Ok(());
            }
            // Replies are looked at in place and copied out; nothing is
            // allocated or reference-counted per message.
            let tag = header.tag;
            if tag == backend::ERROR_RESPONSE && self.pending.is_empty() {
                // Nothing is owed, so this is no reply: the server is ending
                // the connection (shutting down, or terminated by an admin).
                // Between transactions the client need not know; inside one
                // (or an unsynced batch, or a pinned session connection) what
                // it did there is gone, as it would be on PostgreSQL.
                conn.broken = true;
                let fields = backend::ErrorFields::decode(&conn.buf[wire::HEADER_LEN..frame_len])?;
                let message = String::from_utf8_lossy(fields.message).into_owned();
                if self.server_in_transaction()
                    || !self.pending.is_idle()
                    || self.mode == PoolMode::Session
                {
                    return Err(Error::ServerIo(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        message,
                    )));
                }
                tracing::debug!(%message, "server ended an idle connection");
                self.drop_server();
                return Ok(());
            }
            if tag == backend::COMMAND_COMPLETE
                && !self.cache_writes.is_empty()
                && conn.buf[wire::HEADER_LEN..frame_len].starts_with(b"COMMIT")
            {
                // Committed now, whether or not a ReadyForQuery follows soon
                // (an Execute of COMMIT then Flush; `COMMIT; SELECT ...`).
                if let Some(cache) = &self.shared.cache {
                    cache.apply(&mut self.cache_writes);
                }
            }
            if tag == backend::COMMAND_COMPLETE
                && (self.pending.head_has_effects() || !self.txn_effects.is_empty())
            {
                let body = conn.buf[wire::HEADER_LEN..frame_len].to_vec();
                self.on_command_complete(&body)?;
            }
            let conn = self
                .server
                .as_deref_mut()
                .expect("checked at the top of the loop");
            let d = self.pending.on_server_message(tag, &mut self.cout);
            if d.unexpected {
                conn.broken = true;
                return Err(Error::ServerProtocol(format!(
                    "unexpected message 0x{tag:02x} from the server"
                )));
            }
            if d.forward {
                fill_with(
                    &mut self.fill,
                    self.shared.cache.as_deref(),
                    tag,
                    &conn.buf[..frame_len],
                );
            }
            let mut hold = false;
            if d.forward && self.retry.is_some() {
                if tag == backend::ERROR_RESPONSE
                    && server_going_away(&conn.buf[wire::HEADER_LEN..frame_len])
                {
                    // Not for the client: the read goes elsewhere.
                    conn.broken = true;
                    return Err(Error::ServerIo(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the server is shutting down",
                    )));
                }
                let complete = self.retry.as_ref().is_some_and(|r| r.complete);
                if complete
                    && matches!(
                        tag,
                        backend::ROW_DESCRIPTION
                            | backend::BIND_COMPLETE
                            | backend::PARAMETER_DESCRIPTION
                            | backend::NO_DATA
                    )
                {
                    // PostgreSQL sends these before running the query: a
                    // server that fails while running it can still be
                    // replaced, so the client sees nothing yet. (Only once
                    // the whole request is in: a client waiting on Flush for
                    // them must get them.)
                    hold = true;
                } else {
                    // Rows (or the result) reach the client: no going back.
                    keep_read(&mut self.retry, &mut self.held_reply, &mut self.cout);
                }
            }
            if hold {
                self.held_reply.extend_from_slice(&conn.buf[..frame_len]);
            } else if d.forward {
                if tag == backend::READY_FOR_QUERY && status_is_proxys {
                    backend::encode_ready_for_query(&mut self.cout, self.txn_status);
                } else {
                    self.cout.extend_from_slice(&conn.buf[..frame_len]);
                }
            }
            if tag == backend::PARAMETER_STATUS && d.forward {
                // SHOW CLIENTS shows the name the client has now.
                let body = &conn.buf[wire::HEADER_LEN..frame_len];
                if let Ok((b"application_name", name)) = backend::parameter_status(body) {
                    let name = String::from_utf8_lossy(name);
                    self.registration.info().set_application_name(&name);
                }
            }
            if tag == backend::ERROR_RESPONSE && d.forward {
                let body = &conn.buf[wire::HEADER_LEN..frame_len];
                let code = backend::ErrorFields::decode(body).map_or(&b""[..], |f| f.code);
                self.shared.statements.count_error(code, KIND_POSTGRES);
                if let Some(request) = &mut self.in_flight {
                    request.failed = true;
                }
            }
            let status = match tag {
                backend::READY_FOR_QUERY => Some(TransactionStatus::decode(
                    &conn.buf[wire::HEADER_LEN..frame_len],
                )?),
                _ => None,
            };
            conn.buf.advance(frame_len);
            self.pending.drain_local(&mut self.cout);
            for hash in d.unregistered {
                conn.prepared.remove(hash);
            }
            if tag == backend::ERROR_RESPONSE {
                self.error_in_batch = true;
            }
            if let Some(status) = status {
                self.on_ready(status);
                if d.forward {
                    self.request_answered(status);
                }
            }
        }
    }

    /// A statement completed: record what it did to the session. Settings
    /// take effect for the client when their transaction commits; on the
    /// server they are unknown from now until then (see [`params::executed`]).
    fn on_command_complete(&mut self, body: &[u8]) -> Result<()> {
        let tag = backend::command_tag(body)?;
        if let Some(effect) = self.pending.take_effect(tag) {
            let conn = self.server.as_deref_mut().expect("a reply came from it");
            if params::executed(&effect, &mut conn.params) {
                // Prepared statements go at once, whatever becomes of the transaction.
                self.statements.clear();
                conn.prepared.clear();
            }
            self.txn_effects.push(effect);
        }
        if !self.txn_effects.is_empty() {
            match tag {
                b"COMMIT" => self.commit_effects(),
                b"ROLLBACK" => self.txn_effects.clear(),
                _ => {}
            }
        }
        Ok(())
    }

    fn commit_effects(&mut self) {
        let conn = self.server.as_deref_mut().expect("a reply came from it");
        for effect in self.txn_effects.drain(..) {
            params::committed(
                &effect,
                &mut self.params,
                &mut conn.params,
                &self.startup_params,
            );
        }
        self.params_dirty = self.params != conn.params;
    }

    /// Whether the client's transaction status is the proxy's, not the
    /// server's: it began a transaction no server has seen yet (a deferred
    /// BEGIN), or one the proxy aborted.
    fn status_is_proxys(&self) -> bool {
        self.deferred_begin.is_some() || self.aborted_locally
    }

    /// ReadyForQuery: an implicit transaction ends here, committed unless it failed.
    fn on_ready(&mut self, status: TransactionStatus) {
        if status == TransactionStatus::Idle {
            // Before the client can see the reply, which is still in `cout`.
            self.apply_cache_writes();
        }
        if self.status_is_proxys() {
            return;
        }
        self.txn_status = status;
        if status == TransactionStatus::Idle {
            self.publish_in_transaction(false);
        }
        if status == TransactionStatus::Idle && self.txn_wrote {
            self.txn_wrote = false;
            if let Some(shard) = self.server_shard {
                let now = tokio::time::Instant::now();
                self.last_writes
                    .insert(shard, WriteMark::CommittedBefore(now));
            }
        }
        if status == TransactionStatus::Idle && !self.txn_effects.is_empty() {
            if self.error_in_batch {
                self.txn_effects.clear();
            } else {
                self.commit_effects();
            }
        }
        self.error_in_batch = false;
    }
}
