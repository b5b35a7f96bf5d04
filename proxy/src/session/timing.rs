//! Request timing: each request's latency by route, its errors, its SLO
//! window, its span (DEBUG) and the slow-statement log (INFO).
//!
//! A request starts with the client's first message of it (a Query, or the
//! first extended-protocol message after a ReadyForQuery) and ends with the
//! ReadyForQuery that answers it, before the server connection goes back to
//! its pool, so its shard and role are still at hand. Requests the client
//! pipelines behind it are timed from their own first messages.

use std::sync::Arc;
use std::time::Duration;

use tracing::field::{display, Empty};
use wire::frontend;

use super::{InFlight, Session};
use crate::error::Error;
use crate::statement_stats::{Route, RouteRole, RouteShard};
use wire::backend::{self, TransactionStatus};

/// Requests timed separately behind the one in flight; a client that
/// pipelines more has the rest timed as one.
const PIPELINED_MAX: usize = 64;

/// The SQL text put in a statement span is cut at this many bytes.
const SPAN_SQL_BYTES_MAX: usize = 4096;

impl Session {
    /// Starts timing a request at its first message, and notes its end
    /// (Sync, Query, FunctionCall) as sent. Each of those gets exactly one
    /// ReadyForQuery, so a Sync with nothing before it is a request of its
    /// own, and requests and ReadyForQuery messages pair up in order.
    #[inline]
    pub(super) fn track_request(&mut self, tag: u8, body: &[u8]) {
        let ends = matches!(
            tag,
            frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL
        );
        if !ends
            && !matches!(
                tag,
                frontend::PARSE | frontend::BIND | frontend::DESCRIBE | frontend::EXECUTE
            )
        {
            return;
        }
        // Usually the latest request is still open (a Bind after its Parse)
        // and this message goes on with it.
        let open = (self.queued.back().or(self.in_flight.as_ref())).is_some_and(|r| !r.closed);
        if !open {
            self.start_request(tag, body);
        }
        if ends {
            if let Some(r) = self.queued.back_mut().or(self.in_flight.as_mut()) {
                r.closed = true;
            }
        }
    }

    /// A request starts with this message: in flight if none is, else
    /// queued behind the last (unless `PIPELINED_MAX` are queued already).
    fn start_request(&mut self, tag: u8, body: &[u8]) {
        if self.in_flight.is_none() && self.queued.is_empty() {
            let request = self.new_request(tag, body);
            self.in_flight = Some(request);
        } else if self.queued.len() < PIPELINED_MAX {
            let request = self.new_request(tag, body);
            self.queued.push_back(request);
        }
    }

    /// ReadyForQuery to the client, ending the request in flight.
    pub(super) fn ready_for_query(&mut self, status: TransactionStatus) {
        backend::encode_ready_for_query(&mut self.cout, status);
        self.request_answered(status);
    }

    /// The request in flight got its ReadyForQuery (saying `status`): it is
    /// recorded, and the one pipelined behind it is in flight now.
    pub(super) fn request_answered(&mut self, status: TransactionStatus) {
        if let Some(request) = self.in_flight.take() {
            let now = self.now_us();
            let elapsed_us = now.saturating_sub(request.started_us);
            self.count_query(status, now, elapsed_us);
            self.record(request, now, elapsed_us);
        }
        self.in_flight = self.queued.pop_front();
    }

    fn new_request(&mut self, tag: u8, body: &[u8]) -> InFlight {
        let span =
            tracing::enabled!(target: "shardline::statement", tracing::Level::DEBUG).then(|| {
                let sql = self.request_sql(tag, body);
                tracing::debug_span!(
                    target: "shardline::statement",
                    "statement",
                    sql = %sql,
                    shard = Empty,
                    role = Empty,
                    cached = Empty,
                    failed = Empty,
                    duration_us = Empty,
                )
            });
        let now = self.now_us();
        self.registration
            .info()
            .request_us
            .store(now, std::sync::atomic::Ordering::Relaxed);
        if self.txn_status == TransactionStatus::Idle && self.in_flight.is_none() {
            self.xact_start_us = now;
        }
        InFlight {
            started_us: now,
            closed: false,
            failed: false,
            cache_hit: None,
            multi: false,
            span,
        }
    }

    /// The SQL of the request that `frame` starts, for its span: a Query's
    /// or Parse's text, a Bind's statement text.
    fn request_sql(&self, tag: u8, body: &[u8]) -> String {
        let text: &[u8] = match tag {
            frontend::QUERY => body.strip_suffix(&[0]).unwrap_or(body),
            frontend::PARSE => frontend::Parse::decode(body).map_or(&[][..], |p| p.query),
            frontend::BIND => match frontend::Bind::decode(body) {
                Ok(bind) if bind.statement.is_empty() => self
                    .unnamed
                    .as_ref()
                    .map_or(&[][..], |s| super::routing::definition_sql(&s.definition)),
                Ok(bind) => self
                    .statements
                    .get(bind.statement)
                    .map_or(&[][..], |s| super::routing::definition_sql(&s.definition)),
                Err(_) => &[],
            },
            _ => &[],
        };
        let text = &text[..text.len().min(SPAN_SQL_BYTES_MAX)];
        String::from_utf8_lossy(text).into_owned()
    }

    /// The request was answered from the cache, from `shard`'s rows.
    pub(super) fn note_cache_hit(&mut self, shard: u32) {
        if let Some(request) = &mut self.in_flight {
            request.cache_hit = Some(shard);
        }
    }

    /// The request ran on several shards; `code`: the SQLSTATE of the error
    /// the client got from one of them.
    pub(super) fn note_multi(&mut self, code: Option<&[u8]>) {
        if let Some(code) = code {
            self.shared
                .statements
                .count_error(code, crate::statement_stats::KIND_POSTGRES);
        }
        if let Some(request) = &mut self.in_flight {
            request.multi = true;
            request.failed |= code.is_some();
        }
    }

    /// Sends the client the ErrorResponse for `e`, counted.
    pub(super) fn send_error(&mut self, e: &Error) {
        self.shared
            .statements
            .count_error(e.sqlstate().as_bytes(), e.kind().as_str());
        if let Some(request) = &mut self.in_flight {
            request.failed = true;
        }
        e.encode(&mut self.cout);
    }

    fn route_of(&self, request: &InFlight) -> Route {
        let (shard, role) = if let Some(shard) = request.cache_hit {
            (RouteShard::Shard(shard), RouteRole::Proxy)
        } else if request.multi {
            (RouteShard::All, RouteRole::Primary)
        } else if self.server.is_some() {
            let shard = self
                .server_shard
                .map_or(RouteShard::Home, |s| RouteShard::Shard(s.0));
            let replica = self
                .server_hold
                .as_ref()
                .is_some_and(|h| h.node().in_recovery() == Some(true));
            let role = if replica {
                RouteRole::Replica
            } else {
                RouteRole::Primary
            };
            (shard, role)
        } else {
            (RouteShard::Home, RouteRole::Proxy)
        };
        Route {
            shard,
            role,
            cached: request.cache_hit.is_some(),
        }
    }

    fn record(&mut self, request: InFlight, now_us: u64, elapsed_us: u64) {
        let elapsed = Duration::from_micros(elapsed_us);
        let route = self.route_of(&request);
        match &self.route_histogram {
            Some((last, histogram)) if *last == route => histogram.observe(elapsed),
            _ => {
                let histogram = self.shared.statements.histogram(&self.database, route);
                histogram.observe(elapsed);
                self.route_histogram = Some((route, Arc::clone(&histogram)));
            }
        }
        if let Some(slo) = &self.slo {
            slo.record(now_us, elapsed, request.failed);
        }
        if let Some(span) = &request.span {
            span.record("shard", display(route.shard));
            span.record("role", route.role.as_str());
            span.record("cached", route.cached);
            span.record("failed", request.failed);
            span.record("duration_us", elapsed.as_micros() as u64);
            tracing::debug!(target: "shardline::statement", parent: span, "statement done");
        }
        if let Some(min) = self.shared.config.proxy.log_min_duration {
            if elapsed >= min {
                tracing::info!(
                    target: "shardline::slow",
                    database = %self.database,
                    user = %self.user.name,
                    shard = %route.shard,
                    role = route.role.as_str(),
                    cached = route.cached,
                    failed = request.failed,
                    duration_ms = elapsed.as_secs_f64() * 1e3,
                    "slow statement"
                );
            }
        }
    }
}
