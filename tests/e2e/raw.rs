//! Raw: a client speaking the protocol message by message, for the tests of
//! sequences drivers send (batches, pipelines, Flush instead of Sync) or hide.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::backend::ErrorFields;
use wire::Frame;

/// A client speaking the protocol message by message.
pub struct Raw {
    stream: TcpStream,
    buf: BytesMut,
    out: BytesMut,
}

impl Raw {
    /// Logs in to the proxy at `addr` as `trusted` on `db`.
    pub async fn login(addr: SocketAddr) -> Raw {
        let mut raw = Raw {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: BytesMut::new(),
            out: BytesMut::new(),
        };
        frontend::startup_message([("user", "trusted"), ("database", "db")], &mut raw.out)
            .expect("startup");
        raw.until_ready().await;
        raw
    }

    pub fn parse(&mut self, name: &str, sql: &str) -> &mut Self {
        frontend::parse(name, sql, std::iter::empty(), &mut self.out).expect("parse");
        self
    }

    /// Bind with text parameters.
    pub fn bind(&mut self, statement: &str, params: &[&str]) -> &mut Self {
        let r = frontend::bind(
            "",
            statement,
            std::iter::empty::<i16>(),
            params.iter(),
            |p, out| {
                out.extend_from_slice(p.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            std::iter::empty::<i16>(),
            &mut self.out,
        );
        assert!(r.is_ok(), "bind encodes");
        self
    }

    pub fn describe(&mut self, kind: u8, name: &str) -> &mut Self {
        frontend::describe(kind, name, &mut self.out).expect("describe");
        self
    }

    pub fn execute(&mut self) -> &mut Self {
        frontend::execute("", 0, &mut self.out).expect("execute");
        self
    }

    pub fn close_statement(&mut self, name: &str) -> &mut Self {
        frontend::close(b'S', name, &mut self.out).expect("close");
        self
    }

    pub fn sync(&mut self) -> &mut Self {
        frontend::sync(&mut self.out);
        self
    }

    pub fn flush(&mut self) -> &mut Self {
        frontend::flush(&mut self.out);
        self
    }

    pub fn query(&mut self, sql: &str) -> &mut Self {
        frontend::query(sql, &mut self.out).expect("query");
        self
    }

    /// Sends what was queued and reads replies up to the next ReadyForQuery,
    /// summarised: `1` `2` `3` `n` `T` for the bodiless ones, `D:<first
    /// column>`, `C:<tag>`, `E:<sqlstate>`, `Z:<status>`.
    pub async fn until_ready(&mut self) -> Vec<String> {
        self.replies(|r| r.starts_with("Z:")).await
    }

    /// Replies until one matches `last` (summarised as for `until_ready`,
    /// and `EOF` when the proxy closes the connection); panics after 10 s.
    pub async fn replies(&mut self, last: impl FnMut(&str) -> bool) -> Vec<String> {
        match self.replies_within(last, 10).await {
            Some(seen) => seen,
            None => panic!("no reply in 10 s"),
        }
    }

    /// As `replies`, `None` (with what was seen printed) after `secs`.
    pub async fn replies_within(
        &mut self,
        mut last: impl FnMut(&str) -> bool,
        secs: u64,
    ) -> Option<Vec<String>> {
        self.send().await;
        let mut seen = Vec::new();
        let read = async {
            loop {
                let frame = loop {
                    if let Some(frame) = Frame::decode(&mut self.buf, 1 << 24).expect("frame") {
                        break frame;
                    }
                    let n = self.stream.read_buf(&mut self.buf).await.expect("read");
                    if n == 0 {
                        seen.push("EOF".to_owned());
                        return;
                    }
                };
                let body = frame.body();
                let summary = match frame.tag() {
                    b'D' => {
                        let row = wire::rows::data_row(body).expect("row");
                        let first = row.first().copied().flatten().unwrap_or(b"NULL");
                        format!("D:{}", String::from_utf8_lossy(first))
                    }
                    b'C' => format!("C:{}", String::from_utf8_lossy(&body[..body.len() - 1])),
                    b'E' => {
                        let fields = ErrorFields::decode(body).expect("error");
                        format!("E:{}", String::from_utf8_lossy(fields.code))
                    }
                    b'Z' => format!("Z:{}", body[0] as char),
                    b'R' | b'S' | b'K' | b'N' => continue,
                    tag => (tag as char).to_string(),
                };
                let done = last(&summary);
                seen.push(summary);
                if done {
                    return;
                }
            }
        };
        let complete = tokio::time::timeout(Duration::from_secs(secs), read)
            .await
            .is_ok();
        if !complete {
            eprintln!("no reply in {secs} s; so far: {seen:?}");
        }
        complete.then_some(seen)
    }

    /// Sends what was queued, expecting no reply yet.
    pub async fn send(&mut self) {
        let out = std::mem::take(&mut self.out);
        self.stream.write_all(&out).await.expect("send");
    }

    /// FunctionCall (the fast path) of function `oid` with one text argument.
    pub fn function_call(&mut self, oid: u32, arg: &str) -> &mut Self {
        let mut body = Vec::new();
        body.extend_from_slice(&oid.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes()); // one format code
        body.extend_from_slice(&0i16.to_be_bytes()); // text
        body.extend_from_slice(&1i16.to_be_bytes()); // one argument
        body.extend_from_slice(&(arg.len() as i32).to_be_bytes());
        body.extend_from_slice(arg.as_bytes());
        body.extend_from_slice(&0i16.to_be_bytes()); // result text
        self.out.extend_from_slice(b"F");
        self.out
            .extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        self.out.extend_from_slice(&body);
        self
    }
}
