//! Copy in: `COPY table (cols) FROM STDIN` into a sharded table, each row
//! streamed to the shard that owns its key.
//!
//! Every shard starts the COPY inside a transaction; the client's CopyData
//! is cut into rows ([`router::copy_split::CopySplitter`], at most one
//! partial row held) and each row is passed on to its owner. At CopyDone all
//! shards commit only if every shard accepted its rows, so a bad row or a
//! constraint violation on one shard leaves no rows anywhere.

use bytes::BytesMut;
use router::copy_split::{CopyLayout, CopySplitter, Piece};
use router::{Analysis, ShardId, ShardMap};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::frontend;
use wire::Frame;

use super::Session;
use crate::error::{Error, Result};
use crate::scatter;

/// Per-shard output is written once it holds this much.
const SHARD_BUFFER_BYTES: usize = 64 << 10;

/// How the client's side of the COPY ended.
enum End {
    Done,
    Fail(String),
    /// A row the splitter could not read: the client is told why.
    BadRow(String),
}

impl Session {
    /// Runs a COPY FROM STDIN on every shard; the reply (CommandComplete or
    /// the error) is left in `cout`. `true` if it is an error.
    pub(super) async fn copy_in_split(
        &mut self,
        sql: &str,
        analysis: &Analysis,
        map: &ShardMap,
    ) -> Result<bool> {
        let layout = copy_layout(sql, analysis, map).map_err(Error::Refused)?;
        let (layout, owners) = layout;
        let shards: Vec<ShardId> = map.shards.keys().copied().collect();
        let max = self.shared.config.proxy.message_bytes_max;
        let mut conns = self.checkout_all(&shards, map).await?;
        let mut in_copy = vec![false; conns.len()];
        let mut response = None;
        let mut start_error = None;
        for (i, conn) in conns.iter_mut().enumerate() {
            match scatter::start_copy_in(conn, sql, max).await? {
                Ok(frame) => {
                    in_copy[i] = true;
                    response.get_or_insert(frame);
                }
                Err(error) => {
                    start_error = Some(error);
                    break;
                }
            }
        }
        if let Some(error) = start_error {
            let _ = scatter::end_copy_in(
                &mut conns,
                &in_copy,
                Some("another shard refused the COPY"),
                max,
            )
            .await?;
            self.cout.extend_from_slice(error.as_bytes());
            return Ok(true);
        }
        let response = response.expect("at least one shard");
        self.cout.extend_from_slice(response.as_bytes());
        let index_of = |shard: ShardId| shards.iter().position(|&s| s == shard);
        let mut splitter = CopySplitter::new(layout);
        let mut outs: Vec<BytesMut> = vec![BytesMut::new(); conns.len()];
        let end = loop {
            if !self.cout.is_empty() {
                self.client
                    .write_all(&self.cout)
                    .await
                    .map_err(Error::ClientIo)?;
                self.registration.info().counters.add_sent(self.cout.len());
                self.cout.clear();
            }
            let frame = match self.next_client_frame(max).await {
                Ok(frame) => frame,
                Err(e) => {
                    let gone = Some("client went away");
                    let _ = scatter::end_copy_in(&mut conns, &in_copy, gone, max).await;
                    return Err(e);
                }
            };
            let pieces = match frame.tag() {
                frontend::COPY_DATA => splitter.feed(frame.body()),
                frontend::COPY_DONE => match splitter.finish() {
                    Ok(pieces) => {
                        route_pieces(pieces, &owners, &index_of, &mut outs);
                        break End::Done;
                    }
                    Err(why) => break End::BadRow(why),
                },
                frontend::COPY_FAIL => {
                    let reason = String::from_utf8_lossy(
                        frame.body().strip_suffix(&[0]).unwrap_or(frame.body()),
                    )
                    .into_owned();
                    break End::Fail(reason);
                }
                frontend::FLUSH | frontend::SYNC => continue,
                other => {
                    let _ = scatter::end_copy_in(&mut conns, &in_copy, Some("protocol error"), max)
                        .await;
                    return Err(Error::UnexpectedMessage(other));
                }
            };
            match pieces {
                Ok(pieces) => route_pieces(pieces, &owners, &index_of, &mut outs),
                Err(why) => {
                    // Like PostgreSQL: the error, then the rest of the data is discarded.
                    self.discard_copy_data(max).await?;
                    break End::BadRow(why);
                }
            }
            for (conn, out) in conns.iter_mut().zip(outs.iter_mut()) {
                if out.len() >= SHARD_BUFFER_BYTES {
                    scatter::send_buffered(conn, out).await?;
                }
            }
        };
        for (conn, out) in conns.iter_mut().zip(outs.iter_mut()) {
            if !out.is_empty() && matches!(end, End::Done) {
                scatter::send_buffered(conn, out).await?;
            }
        }
        let outcome = match &end {
            End::Done => scatter::end_copy_in(&mut conns, &in_copy, None, max).await?,
            End::Fail(reason) => {
                scatter::end_copy_in(&mut conns, &in_copy, Some(reason), max).await?
            }
            End::BadRow(why) => {
                let _ = scatter::end_copy_in(&mut conns, &in_copy, Some(why), max).await?;
                return Err(Error::CopyData(why.clone()));
            }
        };
        match outcome {
            Ok(rows) => {
                let tag = format!("COPY {rows}");
                wire::rows::encode_command_complete(&mut self.cout, tag.as_bytes());
                Ok(false)
            }
            Err(error) => {
                self.cout.extend_from_slice(error.as_bytes());
                Ok(true)
            }
        }
    }

    /// Reads and drops the client's CopyData up to its CopyDone or CopyFail.
    async fn discard_copy_data(&mut self, max: u32) -> Result<()> {
        loop {
            let frame = self.next_client_frame(max).await?;
            if matches!(frame.tag(), frontend::COPY_DONE | frontend::COPY_FAIL) {
                return Ok(());
            }
        }
    }

    /// The client's next frame, read straight from its socket.
    async fn next_client_frame(&mut self, max: u32) -> Result<Frame> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.cbuf, max)? {
                return Ok(frame);
            }
            self.cbuf.reserve(64 << 10);
            let n = self
                .client
                .read_buf(&mut self.cbuf)
                .await
                .map_err(Error::ClientIo)?;
            if n == 0 {
                return Err(Error::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
            }
            self.registration.info().counters.add_received(n);
        }
    }
}

fn route_pieces(
    pieces: Vec<Piece>,
    owners: &[ShardId],
    index_of: &impl Fn(ShardId) -> Option<usize>,
    outs: &mut [BytesMut],
) {
    for piece in pieces {
        match piece {
            Piece::Row { partition, bytes } => {
                let owner = owners[partition as usize];
                // The map is checked to own every partition by a known shard.
                let i = index_of(owner).expect("partition owners are shards of the map");
                scatter::encode_copy_data(&mut outs[i], &bytes);
            }
            Piece::Shared(bytes) => {
                for out in outs.iter_mut() {
                    scatter::encode_copy_data(out, &bytes);
                }
            }
        }
    }
}

/// The splitter's layout and the owner of every partition.
fn copy_layout(
    sql: &str,
    analysis: &Analysis,
    map: &ShardMap,
) -> std::result::Result<(CopyLayout, Vec<ShardId>), String> {
    let target = analysis
        .targets
        .first()
        .ok_or_else(|| "COPY names no sharded table".to_owned())?;
    let (table, group) = map.table_and_group(&target.table)?;
    let key_column = target.insert_key_column.ok_or_else(|| {
        format!(
            "COPY into sharded table {} must list its key column",
            table.name
        )
    })?;
    let (format, delimiter, header) = router::copy_split::copy_options(sql)?;
    let mut layout = CopyLayout::new(format, key_column, table.key_type, group.modulus());
    if let Some(d) = delimiter {
        layout.delimiter = d;
    }
    layout.header = header;
    let owners = group.partitions.iter().map(|p| p.owner).collect();
    Ok((layout, owners))
}
