//! Scatter/gather: one statement on several shards, their replies merged
//! into the one reply a single PostgreSQL would have sent.
//!
//! The router plans the statement ([`router::scatter::plan`]): the SQL each
//! shard runs and how the rows combine. Here that plan meets the servers:
//! concatenation and ORDER BY merges stream row by row (a k-way merge over
//! the shards' sorted streams, so no result is held whole); aggregates,
//! GROUP BY and DISTINCT collect the shards' partial rows and let PostgreSQL
//! compute the final answer from them on one of the connections. DDL on a
//! sharded table is the other multi-shard job: the same change on every
//! shard, one reply.
//!
//! A connection is marked broken from checkout until a ReadyForQuery that
//! says idle is read from it, so any early exit (an error here, a client
//! that goes away) drops it instead of pooling it mid-statement.

use std::cmp::Ordering;
use std::ops::Range;

use bytes::BytesMut;
use router::scatter::{Bound, Merge, ScatterPlan, SortColumn, SortKey};
use router::ShardId;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use wire::backend::{self, TransactionStatus};
use wire::frontend;
use wire::rows::{self, BindParams, Column};
use wire::Frame;

use crate::error::{Error, Result};
use crate::pool::Pooled;
use crate::server::read_frame;

/// At most this many partial rows (groups times shards) are collected for
/// a final aggregation; past it the statement is refused.
pub const PARTIAL_ROWS_MAX: usize = 100_000;

/// A server connection checked out for one shard.
pub struct ShardConn {
    pub shard: ShardId,
    pub conn: Pooled,
    /// An IO or protocol error: nothing more is read from it.
    failed: bool,
}

impl ShardConn {
    /// Takes `conn` for `shard`; it stays marked broken until it is seen idle.
    pub fn new(shard: ShardId, mut conn: Pooled) -> ShardConn {
        conn.broken = true;
        ShardConn {
            shard,
            conn,
            failed: false,
        }
    }

    fn fail(&mut self) {
        self.failed = true;
        self.conn.broken = true;
    }

    /// A ReadyForQuery was read: poolable again only if idle.
    fn ready(&mut self, body: &[u8]) -> Result<()> {
        self.conn.broken = TransactionStatus::decode(body)? != TransactionStatus::Idle;
        Ok(())
    }
}

/// What the client asked of the statement.
pub struct Request<'a> {
    /// The Bind parameters (extended protocol); `None` for a simple Query.
    pub bind: Option<&'a BindParams<'a>>,
    /// Parameter types from the client's Parse.
    pub param_types: &'a [u32],
    /// Send the RowDescription (simple Query: always; extended: Describe).
    pub describe: bool,
    /// Send the rows and CommandComplete (simple Query: always; extended: Execute).
    pub execute: bool,
}

/// Where merged replies go: the client's output buffer, written to the
/// client whenever it holds `flush_bytes`, so memory stays bounded.
pub struct Sink<'a> {
    pub client: &'a mut TcpStream,
    /// Where the bytes sent to the client are counted.
    pub counters: &'a crate::clients::Counters,
    pub out: &'a mut BytesMut,
    pub flush_bytes: usize,
    /// An ErrorResponse was sent: an extended batch now skips to its Sync.
    pub errored: bool,
    /// The SQLSTATE of the first ErrorResponse sent.
    pub error_code: Option<[u8; 5]>,
}

impl Sink<'_> {
    async fn flush_if_full(&mut self) -> Result<()> {
        if self.out.len() >= self.flush_bytes {
            self.client
                .write_all(self.out)
                .await
                .map_err(Error::ClientIo)?;
            self.counters.add_sent(self.out.len());
            self.out.clear();
        }
        Ok(())
    }
}

/// One reply event of a shard running one statement.
enum Event {
    Description(Frame),
    Row(Frame),
    Complete(Frame),
    Error(Frame),
}

async fn send(conn: &mut ShardConn, bytes: &[u8]) -> Result<()> {
    let sent = conn.conn.stream.write_all(bytes).await;
    sent.map_err(|e| {
        conn.fail();
        Error::ServerIo(e)
    })
}

/// The next frame from the connection.
async fn read(conn: &mut ShardConn, max: u32) -> Result<Frame> {
    let server = &mut *conn.conn;
    let frame = read_frame(&mut server.stream, &mut server.buf, max).await;
    if frame.is_err() {
        conn.fail();
    }
    frame
}

async fn next_event(conn: &mut ShardConn, max: u32) -> Result<Event> {
    loop {
        let frame = read(conn, max).await?;
        match frame.tag() {
            backend::PARSE_COMPLETE
            | backend::BIND_COMPLETE
            | backend::NOTICE_RESPONSE
            | backend::PARAMETER_STATUS
            | backend::NOTIFICATION_RESPONSE => continue,
            backend::ROW_DESCRIPTION => return Ok(Event::Description(frame)),
            backend::DATA_ROW => return Ok(Event::Row(frame)),
            backend::COMMAND_COMPLETE | backend::EMPTY_QUERY_RESPONSE => {
                return Ok(Event::Complete(frame))
            }
            backend::ERROR_RESPONSE => return Ok(Event::Error(frame)),
            other => {
                conn.fail();
                return Err(Error::ServerProtocol(format!(
                    "unexpected message 0x{other:02x} from shard {} during a multi-shard statement",
                    conn.shard
                )));
            }
        }
    }
}

/// Reads and drops replies up to ReadyForQuery; the connection may then be
/// pooled again only if it is idle.
async fn finish(conn: &mut ShardConn, max: u32) -> Result<()> {
    loop {
        let frame = read(conn, max).await?;
        if frame.tag() == backend::READY_FOR_QUERY {
            return conn.ready(frame.body());
        }
    }
}

/// Appends the request for `sql` in the client's protocol.
fn encode_request(buf: &mut BytesMut, sql: &str, req: &Request<'_>, result_formats: &[i16]) {
    match req.bind {
        None => frontend::encode_query(buf, sql.as_bytes()),
        Some(bind) => {
            let mut definition = Vec::with_capacity(sql.len() + 3 + 4 * req.param_types.len());
            definition.extend_from_slice(sql.as_bytes());
            definition.push(0);
            definition.extend_from_slice(&(req.param_types.len() as i16).to_be_bytes());
            for t in req.param_types {
                definition.extend_from_slice(&t.to_be_bytes());
            }
            frontend::encode_parse(buf, b"", &definition);
            bind.encode_unnamed(buf, result_formats);
            frontend::encode_target(buf, frontend::DESCRIBE, frontend::TARGET_PORTAL, b"");
            rows::encode_execute_unnamed(buf);
            frontend::encode_sync(buf);
        }
    }
}

/// Runs `plan` on every connection and writes the merged reply to `sink`.
pub async fn gather(
    conns: &mut [ShardConn],
    plan: &ScatterPlan,
    table: &str,
    req: &Request<'_>,
    sink: &mut Sink<'_>,
    max: u32,
) -> Result<()> {
    let client_formats = req.bind.map_or(&[][..], |b| &b.result_formats[..]);
    let formats: Vec<i16> = match &plan.merge {
        // Partial rows are read as text; PostgreSQL formats the final ones.
        Merge::Final(_) => Vec::new(),
        _ if client_formats.len() > 1 && plan.hidden_columns > 0 => {
            let mut f = client_formats.to_vec();
            f.extend(std::iter::repeat(0).take(plan.hidden_columns));
            f
        }
        _ => client_formats.to_vec(),
    };
    // Everything that can fail without the shards comes before they are asked.
    let bounds = match &plan.merge {
        Merge::Concat { limit, offset } | Merge::Sorted { limit, offset, .. } => {
            Bounds::resolve(*limit, *offset, req.bind)?
        }
        Merge::Final(_) => Bounds {
            offset: 0,
            limit: None,
        },
    };
    let first = conns.first_mut().expect("at least one shard");
    let facts = Facts::read(first, &plan.functions, table, max).await?;
    if let Some(names) = &facts.unsplittable {
        return Err(Error::Refused(format!(
            "{names}: an aggregate, set-returning or volatile function is not supported in a \
             query that runs on every shard"
        )));
    }
    let final_merge = matches!(plan.merge, Merge::Final(_));
    if final_merge && !facts.utf8 {
        return Err(Error::Refused(
            "aggregates, GROUP BY and DISTINCT across shards need client_encoding UTF8".into(),
        ));
    }
    let mut request = BytesMut::new();
    if final_merge {
        // Partial values travel as text and are read back by PostgreSQL:
        // output styles that lose precision or are ambiguous are avoided.
        frontend::encode_query(&mut request, EXACT_TEXT.as_bytes());
    }
    encode_request(&mut request, &plan.shard_sql, req, &formats);
    for conn in conns.iter_mut() {
        send(conn, &request).await?;
        if final_merge {
            if let (Some(error), _) = read_outcome(conn, max).await? {
                return forward_error(sink, error);
            }
        }
    }
    let merged = match &plan.merge {
        Merge::Final(final_plan) => {
            gather_final(conns, final_plan, &facts, req, client_formats, sink, max).await
        }
        Merge::Concat { .. } | Merge::Sorted { .. } => {
            let keys = match &plan.merge {
                Merge::Sorted { keys, .. } => &keys[..],
                _ => &[],
            };
            let shape = (plan.hidden_columns, keys);
            stream(conns, shape, &facts, bounds, req, sink, max).await
        }
    };
    // Every connection is read to its end, whatever happened above.
    let mut drained = Ok(());
    for conn in conns.iter_mut() {
        if !conn.failed {
            if let Err(e) = finish(conn, max).await {
                drained = Err(e);
            }
        }
    }
    if final_merge && merged.is_ok() && drained.is_ok() {
        // The partial phase ran in a transaction (for SET LOCAL); the first
        // connection ended it before the final statement.
        for conn in conns.iter_mut().skip(1) {
            end_transaction(conn, max).await?;
        }
    }
    merged.and(drained)
}

/// Settings for the partial rows of a final aggregation, local to a
/// transaction: floats exact, dates and intervals in unambiguous styles.
const EXACT_TEXT: &str = "BEGIN; SET LOCAL extra_float_digits = 3; \
     SET LOCAL DateStyle = 'ISO, MDY'; SET LOCAL IntervalStyle = 'postgres'";

async fn end_transaction(conn: &mut ShardConn, max: u32) -> Result<()> {
    let mut request = BytesMut::new();
    frontend::encode_query(&mut request, b"COMMIT");
    send(conn, &request).await?;
    read_outcome(conn, max).await.map(|_| ())
}

/// What the planner cannot know without the catalog, read from one shard
/// before a scatter runs.
struct Facts {
    /// Functions the query calls that are aggregates, return sets or are volatile.
    unsplittable: Option<String>,
    /// Text of the table and the database default sorts as bytes (C, POSIX).
    bytewise: bool,
    /// client_encoding is UTF8.
    utf8: bool,
    /// extra_float_digits >= 1: float text is exact.
    floats_exact: bool,
}

impl Facts {
    async fn read(
        conn: &mut ShardConn,
        functions: &[String],
        table: &str,
        max: u32,
    ) -> Result<Facts> {
        let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let names: Vec<String> = functions
            .iter()
            .map(|f| quote(f.rsplit('.').next().unwrap_or(f)))
            .collect();
        let sql = format!(
            "WITH d AS (SELECT coalesce(to_jsonb(db) ->> 'datlocprovider', 'c') = 'c' \
               AND db.datcollate IN ('C', 'POSIX', 'C.UTF-8', 'C.utf8') AS ok \
               FROM pg_database db WHERE db.datname = current_database()) \
             SELECT (SELECT string_agg(DISTINCT p.proname, ', ') FROM pg_proc p \
               WHERE p.proname = ANY(ARRAY[{names}]::name[]) \
               AND (p.prokind <> 'f' OR p.proretset OR p.provolatile = 'v')), \
             (SELECT ok FROM d) AND coalesce((SELECT bool_and(c.collname IN ('C', 'POSIX', \
               'ucs_basic') OR (c.collname = 'default' AND (SELECT ok FROM d))) \
               FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation \
               WHERE a.attrelid = to_regclass({table}) AND a.attnum > 0 \
               AND NOT a.attisdropped), true), \
             current_setting('client_encoding') = 'UTF8', \
             current_setting('extra_float_digits')::int >= 1",
            names = names.join(", "),
            table = quote(table),
        );
        let mut request = BytesMut::new();
        frontend::encode_query(&mut request, sql.as_bytes());
        send(conn, &request).await?;
        let mut row = None;
        let mut error = None;
        loop {
            let frame = read(conn, max).await?;
            match frame.tag() {
                backend::DATA_ROW => {
                    let values = rows::data_row(frame.body())?;
                    let text = |i: usize| values.get(i).copied().flatten().map(<[u8]>::to_vec);
                    row = Some((text(0), text(1), text(2), text(3)));
                }
                backend::ERROR_RESPONSE => {
                    let fields = backend::ErrorFields::decode(frame.body())?;
                    error = Some(String::from_utf8_lossy(fields.message).into_owned());
                }
                backend::READY_FOR_QUERY => {
                    conn.ready(frame.body())?;
                    break;
                }
                _ => {}
            }
        }
        let yes = |v: &Option<Vec<u8>>| v.as_deref() == Some(b"t");
        match (row, error) {
            (Some((functions, bytewise, utf8, floats)), None) => Ok(Facts {
                unsplittable: functions.map(|f| String::from_utf8_lossy(&f).into_owned()),
                bytewise: yes(&bytewise),
                utf8: yes(&utf8),
                floats_exact: yes(&floats),
            }),
            (_, error) => Err(Error::ServerProtocol(format!(
                "reading the catalog before a multi-shard query failed: {}",
                error.unwrap_or_default()
            ))),
        }
    }
}

/// float4, float8.
fn is_float(type_oid: u32) -> bool {
    matches!(type_oid, 700 | 701)
}

/// Type OIDs whose order depends on the collation.
fn collatable(type_oid: u32) -> bool {
    // text, name, bpchar, varchar
    matches!(type_oid, 25 | 19 | 1042 | 1043)
}

/// OFFSET and LIMIT as numbers.
#[derive(Clone, Copy)]
struct Bounds {
    offset: u64,
    limit: Option<u64>,
}

impl Bounds {
    fn resolve(
        limit: Option<Bound>,
        offset: Option<Bound>,
        bind: Option<&BindParams<'_>>,
    ) -> Result<Bounds> {
        let value = |bound: Option<Bound>| -> Result<Option<u64>> {
            let Some(bound) = bound else { return Ok(None) };
            let n = match bound {
                Bound::Const(n) => n,
                Bound::Param(p) => match param_int(bind, p)? {
                    Some(n) => n,
                    None => return Ok(None), // LIMIT NULL: no limit
                },
            };
            // A negative bound makes the shards fail with PostgreSQL's own error.
            Ok(Some(n.max(0) as u64))
        };
        Ok(Bounds {
            offset: value(offset)?.unwrap_or(0),
            limit: value(limit)?,
        })
    }
}

/// An integer parameter in text or binary format.
fn param_int(bind: Option<&BindParams<'_>>, n: u16) -> Result<Option<i64>> {
    let bad = || Error::Refused(format!("parameter ${n} of LIMIT/OFFSET is not an integer"));
    let bind = bind.ok_or_else(bad)?;
    let index = (n as usize).checked_sub(1).ok_or_else(bad)?;
    let Some(value) = bind.values.get(index).ok_or_else(bad)? else {
        return Ok(None);
    };
    let parsed = if rows::format_of(&bind.formats, index) == 1 {
        match value[..] {
            [a, b, c, d] => Some(i32::from_be_bytes([a, b, c, d]).into()),
            [a, b, c, d, e, f, g, h] => Some(i64::from_be_bytes([a, b, c, d, e, f, g, h])),
            [a, b] => Some(i16::from_be_bytes([a, b]).into()),
            _ => None,
        }
    } else {
        std::str::from_utf8(value)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    parsed.map(Some).ok_or_else(bad)
}

/// A shard's current row, with the byte ranges of its values.
struct Head {
    frame: Frame,
    values: Vec<Option<Range<usize>>>,
}

impl Head {
    fn new(frame: Frame) -> Result<Head> {
        let body = frame.body();
        let base = body.as_ptr() as usize;
        let values = rows::data_row(body)?
            .into_iter()
            .map(|v| {
                v.map(|s| (s.as_ptr() as usize - base)..(s.as_ptr() as usize - base + s.len()))
            })
            .collect();
        Ok(Head { frame, values })
    }

    fn value(&self, i: usize) -> Option<&[u8]> {
        self.values
            .get(i)
            .cloned()
            .flatten()
            .map(|r| &self.frame.body()[r])
    }
}

/// Concatenation (no keys) or k-way merge by `keys`, then OFFSET/LIMIT.
/// `shape`: the hidden trailing columns and the sort keys (none: concatenate).
async fn stream(
    conns: &mut [ShardConn],
    (hidden, keys): (usize, &[SortKey]),
    facts: &Facts,
    bounds: Bounds,
    req: &Request<'_>,
    sink: &mut Sink<'_>,
    max: u32,
) -> Result<()> {
    // Every shard describes the same columns; the first description is sent.
    let mut description = None;
    let mut heads: Vec<Option<Head>> = Vec::with_capacity(conns.len());
    for conn in conns.iter_mut() {
        match next_event(conn, max).await? {
            Event::Description(frame) => {
                description.get_or_insert(frame);
            }
            Event::Error(frame) => return forward_error(sink, frame),
            _ => {
                conn.fail();
                return Err(Error::ServerProtocol(format!(
                    "shard {} sent rows without a RowDescription",
                    conn.shard
                )));
            }
        }
    }
    let description = description.expect("at least one shard");
    let columns = rows::row_description(description.body())?;
    let visible = columns.len().saturating_sub(hidden);
    let sort: Vec<(SortKey, usize, &Column<'_>)> = keys
        .iter()
        .map(|k| {
            let index = match k.column {
                SortColumn::Visible(i) => i,
                SortColumn::Hidden(j) => visible + j,
            };
            let column = columns.get(index).ok_or_else(|| {
                Error::ServerProtocol(format!("sort column {index} is not in the result"))
            })?;
            let name = String::from_utf8_lossy(column.name);
            if collatable(column.type_oid) && !facts.bytewise {
                return Err(Error::Refused(format!(
                    "ORDER BY on text column \"{name}\" across shards needs the C or POSIX \
                     collation (Shardline merges the shards' rows by byte order)"
                )));
            }
            if is_float(column.type_oid) && column.format == 0 && !facts.floats_exact {
                return Err(Error::Refused(format!(
                    "ORDER BY on float column \"{name}\" across shards needs extra_float_digits \
                     of at least 1 (rounded text would merge in the wrong order)"
                )));
            }
            Ok((*k, index, column))
        })
        .collect::<Result<_>>()?;
    if req.describe {
        rows::encode_row_description(sink.out, &columns[..visible]);
    }

    let (mut skipped, mut sent) = (0u64, 0u64);
    let full = |sent: u64| bounds.limit.is_some_and(|l| sent >= l);
    // Concatenation reads the shards one after the other; a merge keeps one
    // row per shard and always emits the smallest.
    let mut done = vec![false; conns.len()];
    for i in 0..conns.len() {
        heads.push(None);
        if !sort.is_empty() || i == 0 {
            if let Some(e) = advance(conns, i, &mut heads, &mut done, max).await? {
                return forward_error(sink, e);
            }
        }
    }
    let mut current = 0;
    loop {
        if full(sent) {
            break;
        }
        let next = if sort.is_empty() {
            while current < conns.len() && heads[current].is_none() {
                current += 1;
                if current < conns.len() {
                    if let Some(e) = advance(conns, current, &mut heads, &mut done, max).await? {
                        return forward_error(sink, e);
                    }
                }
            }
            (current < conns.len()).then_some(current)
        } else {
            smallest(&heads, &sort)?
        };
        let Some(i) = next else { break };
        let head = heads[i].take().expect("chosen heads exist");
        if skipped < bounds.offset {
            skipped += 1;
        } else {
            if req.execute {
                emit_row(sink.out, &head, visible, hidden);
            }
            sent += 1;
            sink.flush_if_full().await?;
        }
        if let Some(e) = advance(conns, i, &mut heads, &mut done, max).await? {
            return forward_error(sink, e);
        }
    }
    if req.execute {
        rows::encode_command_complete(sink.out, format!("SELECT {sent}").as_bytes());
    }
    Ok(())
}

/// Reads shard `i`'s next row into `heads[i]` (none once it completed).
/// Returns a PostgreSQL error to forward.
async fn advance(
    conns: &mut [ShardConn],
    i: usize,
    heads: &mut [Option<Head>],
    done: &mut [bool],
    max: u32,
) -> Result<Option<Frame>> {
    if done[i] {
        return Ok(None);
    }
    match next_event(&mut conns[i], max).await? {
        Event::Row(frame) => heads[i] = Some(Head::new(frame)?),
        Event::Complete(_) => done[i] = true,
        Event::Error(frame) => {
            done[i] = true;
            return Ok(Some(frame));
        }
        Event::Description(_) => {
            conns[i].fail();
            return Err(Error::ServerProtocol("a second RowDescription".into()));
        }
    }
    Ok(None)
}

fn smallest(
    heads: &[Option<Head>],
    sort: &[(SortKey, usize, &Column<'_>)],
) -> Result<Option<usize>> {
    let mut best: Option<usize> = None;
    for (i, head) in heads.iter().enumerate() {
        let Some(head) = head else { continue };
        let Some(b) = best else {
            best = Some(i);
            continue;
        };
        let other = heads[b].as_ref().expect("best is a head");
        let mut order = Ordering::Equal;
        for (key, index, column) in sort {
            order = router::merge::compare(
                key,
                column.type_oid,
                column.format,
                head.value(*index),
                other.value(*index),
            )
            .map_err(Error::Refused)?;
            if order != Ordering::Equal {
                break;
            }
        }
        if order == Ordering::Less {
            best = Some(i);
        }
    }
    Ok(best)
}

fn emit_row(out: &mut BytesMut, head: &Head, visible: usize, hidden: usize) {
    if hidden == 0 {
        out.extend_from_slice(head.frame.as_bytes());
    } else {
        let values: Vec<Option<&[u8]>> = (0..visible).map(|i| head.value(i)).collect();
        rows::encode_data_row(out, &values);
    }
}

fn forward_error(sink: &mut Sink<'_>, frame: Frame) -> Result<()> {
    sink.out.extend_from_slice(frame.as_bytes());
    if sink.error_code.is_none() {
        let code = backend::ErrorFields::decode(frame.body()).ok();
        sink.error_code = Some(
            code.and_then(|f| f.code.try_into().ok())
                .unwrap_or(*b"XX000"),
        );
    }
    sink.errored = true;
    Ok(())
}

/// Aggregates, GROUP BY, DISTINCT: the shards' partial rows, then the final
/// statement over them on the first connection.
async fn gather_final(
    conns: &mut [ShardConn],
    plan: &router::scatter::FinalPlan,
    facts: &Facts,
    req: &Request<'_>,
    client_formats: &[i16],
    sink: &mut Sink<'_>,
    max: u32,
) -> Result<()> {
    let mut types: Option<Vec<u32>> = None;
    let mut partial: Vec<Vec<Option<String>>> = Vec::new();
    for conn in conns.iter_mut() {
        loop {
            match next_event(conn, max).await? {
                Event::Description(frame) => {
                    let columns = rows::row_description(frame.body())?;
                    if !facts.bytewise {
                        if let Some(c) = columns.iter().find(|c| collatable(c.type_oid)) {
                            return Err(Error::Refused(format!(
                                "grouping, DISTINCT, min or max of text (\"{}\") across shards \
                                 needs the C or POSIX collation",
                                String::from_utf8_lossy(c.name)
                            )));
                        }
                    }
                    types.get_or_insert_with(|| columns.iter().map(|c| c.type_oid).collect());
                }
                Event::Row(frame) => {
                    if partial.len() >= PARTIAL_ROWS_MAX {
                        return Err(Error::Refused(format!(
                            "the query produces more than {PARTIAL_ROWS_MAX} partial rows (groups) \
                             across shards to merge; add a shard key to the WHERE clause or \
                             aggregate more coarsely"
                        )));
                    }
                    let mut row = Vec::new();
                    for value in rows::data_row(frame.body())? {
                        let text = value.map(|v| std::str::from_utf8(v).map(str::to_owned));
                        row.push(text.transpose().map_err(|_| {
                            Error::ServerProtocol("a partial value is not UTF-8".into())
                        })?);
                    }
                    partial.push(row);
                }
                Event::Complete(_) => break,
                Event::Error(frame) => return forward_error(sink, frame),
            }
        }
    }
    let types = types.unwrap_or_default();
    let final_sql = plan
        .final_sql(&types, &partial)
        .map_err(|r| Error::Refused(r.0))?;
    drop(partial);
    let first = conns.first_mut().expect("at least one shard");
    finish(first, max).await?;
    // The final statement runs with the client's own output settings.
    end_transaction(first, max).await?;
    let mut request = BytesMut::new();
    let final_req = Request {
        bind: req.bind.map(|_| &NO_PARAMS),
        param_types: &[],
        describe: true,
        execute: true,
    };
    encode_request(&mut request, &final_sql, &final_req, client_formats);
    send(first, &request).await?;
    loop {
        match next_event(first, max).await? {
            Event::Description(frame) => {
                if req.describe {
                    sink.out.extend_from_slice(frame.as_bytes());
                }
            }
            Event::Row(frame) => {
                if req.execute {
                    sink.out.extend_from_slice(frame.as_bytes());
                    sink.flush_if_full().await?;
                }
            }
            Event::Complete(frame) => {
                if req.execute {
                    sink.out.extend_from_slice(frame.as_bytes());
                }
                return Ok(());
            }
            Event::Error(frame) => return forward_error(sink, frame),
        }
    }
}

static NO_PARAMS: BindParams<'static> = BindParams {
    formats: Vec::new(),
    values: Vec::new(),
    result_formats: Vec::new(),
};

/// Runs each shard's statements in a transaction on every shard, shard
/// after shard, and commits them all only if every shard succeeded (a DROP
/// that fails on one shard leaves the table on all). `CONCURRENTLY`, which
/// PostgreSQL refuses inside a transaction, runs shard by shard instead. The
/// client gets the first error, or the last CommandComplete.
pub async fn broadcast(
    conns: &mut [ShardConn],
    statements: &[String],
    sink: &mut Sink<'_>,
    max: u32,
) -> Result<()> {
    let atomic = !statements
        .iter()
        .any(|s| s.to_ascii_lowercase().contains("concurrently"));
    let mut last = None;
    let mut failed = None;
    for (conn, sql) in conns.iter_mut().zip(statements) {
        let mut request = BytesMut::new();
        if atomic {
            frontend::encode_query(&mut request, b"BEGIN");
        }
        frontend::encode_query(&mut request, sql.as_bytes());
        send(conn, &request).await?;
        if atomic {
            if let (Some(error), _) = read_outcome(conn, max).await? {
                failed = Some(error);
                break;
            }
        }
        let mut error = None;
        loop {
            let frame = read(conn, max).await?;
            match frame.tag() {
                backend::COMMAND_COMPLETE => last = Some(frame),
                backend::ERROR_RESPONSE => error = error.or(Some(frame)),
                backend::READY_FOR_QUERY => {
                    conn.ready(frame.body())?;
                    break;
                }
                _ => {}
            }
        }
        if error.is_some() {
            failed = error;
            break;
        }
    }
    if atomic {
        let commit_error = end_all(conns, failed.is_none(), max).await?;
        failed = failed.or(commit_error);
    }
    match (failed, last) {
        (Some(error), _) => forward_error(sink, error),
        (None, Some(frame)) => {
            sink.out.extend_from_slice(frame.as_bytes());
            Ok(())
        }
        (None, None) => Ok(()),
    }
}

/// Reads one statement's replies up to ReadyForQuery: the first error, and
/// the rows counted by CommandComplete tags (`INSERT 0 n`, `COPY n`, ...).
async fn read_outcome(conn: &mut ShardConn, max: u32) -> Result<(Option<Frame>, u64)> {
    let mut error = None;
    let mut rows = 0;
    loop {
        let frame = read(conn, max).await?;
        match frame.tag() {
            backend::COMMAND_COMPLETE => {
                let tag = backend::command_tag(frame.body())?;
                rows += tag_rows(tag);
            }
            backend::ERROR_RESPONSE => error = error.or(Some(frame)),
            backend::READY_FOR_QUERY => {
                conn.ready(frame.body())?;
                return Ok((error, rows));
            }
            _ => {}
        }
    }
}

/// The row count at the end of a command tag (`INSERT 0 5` is 5).
pub fn tag_rows(tag: &[u8]) -> u64 {
    tag.rsplit(|&b| b == b' ')
        .next()
        .and_then(|n| std::str::from_utf8(n).ok())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Ends the transaction opened on every connection: COMMIT on each when
/// `commit`, else ROLLBACK. A COMMIT that fails rolls back the shards not yet
/// committed; returns the first error.
async fn end_all(conns: &mut [ShardConn], mut commit: bool, max: u32) -> Result<Option<Frame>> {
    let mut first_error = None;
    for conn in conns.iter_mut() {
        let sql: &[u8] = if commit { b"COMMIT" } else { b"ROLLBACK" };
        let mut request = BytesMut::new();
        frontend::encode_query(&mut request, sql);
        send(conn, &request).await?;
        let (error, _) = read_outcome(conn, max).await?;
        if let Some(error) = error {
            commit = false;
            first_error = first_error.or(Some(error));
        }
    }
    Ok(first_error)
}

/// A multi-row INSERT cut per shard ([`router::insert_split`]): every piece
/// runs in a transaction on its shard, and all commit only if all pieces
/// succeeded. (Without two-phase commit a crash between the COMMITs can
/// still leave some shards committed; the pieces never half-apply otherwise.)
pub async fn insert_split(
    conns: &mut [ShardConn],
    pieces: &[router::insert_split::ShardInsert],
    req: &Request<'_>,
    sink: &mut Sink<'_>,
    max: u32,
) -> Result<()> {
    let mut first_error = None;
    let mut total = 0;
    for (conn, piece) in conns.iter_mut().zip(pieces) {
        let mut request = BytesMut::new();
        frontend::encode_query(&mut request, b"BEGIN");
        match req.bind {
            None => frontend::encode_query(&mut request, piece.sql.as_bytes()),
            Some(bind) => {
                let index = |p: &u16| (*p as usize).saturating_sub(1);
                let types: Vec<u32> = piece
                    .params
                    .iter()
                    .map(|p| req.param_types.get(index(p)).copied().unwrap_or(0))
                    .collect();
                let params = BindParams {
                    formats: piece
                        .params
                        .iter()
                        .map(|p| rows::format_of(&bind.formats, index(p)))
                        .collect(),
                    values: piece
                        .params
                        .iter()
                        .map(|p| bind.values.get(index(p)).copied().flatten())
                        .collect(),
                    result_formats: Vec::new(),
                };
                let piece_req = Request {
                    bind: Some(&params),
                    param_types: &types,
                    describe: false,
                    execute: true,
                };
                encode_request(&mut request, &piece.sql, &piece_req, &[]);
            }
        }
        send(conn, &request).await?;
        let (begin_error, _) = read_outcome(conn, max).await?;
        let (error, rows) = read_outcome(conn, max).await?;
        total += rows;
        if let Some(error) = begin_error.or(error) {
            first_error = first_error.or(Some(error));
        }
    }
    let commit_error = end_all(conns, first_error.is_none(), max).await?;
    match first_error.or(commit_error) {
        Some(error) => forward_error(sink, error),
        None => {
            if req.execute {
                rows::encode_command_complete(sink.out, format!("INSERT 0 {total}").as_bytes());
            }
            Ok(())
        }
    }
}

/// Sends `BEGIN` and then `sql` (a COPY FROM STDIN) and reads up to the
/// CopyInResponse, or, if the COPY failed to start, the error (the
/// connection is then idle in a failed transaction).
pub async fn start_copy_in(
    conn: &mut ShardConn,
    sql: &str,
    max: u32,
) -> Result<Result<Frame, Frame>> {
    let mut request = BytesMut::new();
    frontend::encode_query(&mut request, b"BEGIN");
    frontend::encode_query(&mut request, sql.as_bytes());
    send(conn, &request).await?;
    let (begin_error, _) = read_outcome(conn, max).await?;
    if let Some(error) = begin_error {
        let (_, _) = read_outcome(conn, max).await?;
        return Ok(Err(error));
    }
    loop {
        let frame = read(conn, max).await?;
        match frame.tag() {
            backend::COPY_IN_RESPONSE => return Ok(Ok(frame)),
            backend::ERROR_RESPONSE => {
                let (_, _) = read_outcome(conn, max).await?;
                return Ok(Err(frame));
            }
            backend::NOTICE_RESPONSE | backend::PARAMETER_STATUS => {}
            other => {
                conn.fail();
                return Err(Error::ServerProtocol(format!(
                    "unexpected message 0x{other:02x} from shard {} starting a COPY",
                    conn.shard
                )));
            }
        }
    }
}

/// Ends a split COPY on every connection (those in COPY mode get `done`,
/// CopyDone or CopyFail), then commits all or rolls back all. Returns the
/// rows copied or the first error.
pub async fn end_copy_in(
    conns: &mut [ShardConn],
    in_copy: &[bool],
    done: Option<&str>,
    max: u32,
) -> Result<std::result::Result<u64, Frame>> {
    let mut first_error = None;
    let mut total = 0;
    for (conn, &copying) in conns.iter_mut().zip(in_copy) {
        if !copying {
            continue;
        }
        let mut request = BytesMut::new();
        match done {
            None => rows::encode_empty(&mut request, frontend::COPY_DONE),
            Some(reason) => {
                request.extend_from_slice(&[frontend::COPY_FAIL]);
                request.extend_from_slice(&(4 + reason.len() as i32 + 1).to_be_bytes());
                request.extend_from_slice(reason.as_bytes());
                request.extend_from_slice(&[0]);
            }
        }
        send(conn, &request).await?;
        let (error, rows) = read_outcome(conn, max).await?;
        total += rows;
        first_error = first_error.or(error);
    }
    let commit_error = end_all(conns, first_error.is_none() && done.is_none(), max).await?;
    Ok(match first_error.or(commit_error) {
        Some(error) => Err(error),
        None => Ok(total),
    })
}

/// Appends a CopyData (F) with `data`.
pub fn encode_copy_data(out: &mut BytesMut, data: &[u8]) {
    out.extend_from_slice(&[frontend::COPY_DATA]);
    out.extend_from_slice(&(4 + data.len() as i32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Writes `bytes` to the connection and empties it.
pub async fn send_buffered(conn: &mut ShardConn, bytes: &mut BytesMut) -> Result<()> {
    send(conn, bytes).await?;
    bytes.clear();
    Ok(())
}
