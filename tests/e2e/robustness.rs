//! Bad input: garbage, oversized lengths and truncated frames get SQLSTATE
//! 08P01 and a closed connection, while other clients carry on.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::backend::ErrorFields;
use wire::Frame;

use crate::harness::Env;

/// Logs in as the trust user over a raw socket.
async fn raw_login(env: &Env) -> TcpStream {
    let mut stream = TcpStream::connect(env.addr).await.unwrap();
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "trusted"), ("database", "db")],
        &mut out,
    )
    .unwrap();
    stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        let frame = read_frame(&mut stream, &mut buf)
            .await
            .expect("login replies");
        if frame.tag() == b'Z' {
            return stream;
        }
    }
}

async fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut) -> Option<Frame> {
    loop {
        if let Some(frame) = Frame::decode(buf, 1 << 20).unwrap() {
            return Some(frame);
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// Reads until the connection closes; returns the SQLSTATEs of the errors seen.
async fn errors_until_closed(stream: &mut TcpStream) -> Vec<String> {
    let mut buf = BytesMut::new();
    let mut codes = Vec::new();
    let read = async {
        while let Some(frame) = read_frame(stream, &mut buf).await {
            if frame.tag() == b'E' {
                let fields = ErrorFields::decode(frame.body()).unwrap();
                codes.push(String::from_utf8_lossy(fields.code).into_owned());
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("the proxy closes the connection");
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_08p01_and_others_carry_on() {
    let env = Env::start().await;
    let bystander = env.client().await;
    bystander.batch_execute("BEGIN").await.unwrap();

    // An unknown message type after login.
    let mut s = raw_login(&env).await;
    s.write_all(b"\x01\x00\x00\x00\x08garb").await.unwrap();
    assert_eq!(errors_until_closed(&mut s).await, ["08P01"]);

    // An oversized length: refused from the header alone.
    let mut s = raw_login(&env).await;
    s.write_all(b"Q\x7f\xff\xff\xff").await.unwrap();
    assert_eq!(errors_until_closed(&mut s).await, ["08P01"]);

    // A negative length.
    let mut s = raw_login(&env).await;
    s.write_all(b"Q\xff\xff\xff\x00").await.unwrap();
    assert_eq!(errors_until_closed(&mut s).await, ["08P01"]);

    // A truncated frame, then end of input.
    let mut s = raw_login(&env).await;
    s.write_all(b"Q\x00\x00\x00\x64SELECT").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(errors_until_closed(&mut s).await, ["08P01"]);

    // A malformed Parse (declares 3 parameter types, carries none).
    let mut s = raw_login(&env).await;
    let mut out = BytesMut::new();
    out.put_u8(b'P');
    out.put_i32(4 + 2 + 9 + 2);
    out.put_slice(b"s\0select 1\0");
    out.put_i16(3);
    s.write_all(&out).await.unwrap();
    assert_eq!(errors_until_closed(&mut s).await, ["08P01"]);

    // Garbage instead of a startup packet.
    for garbage in [
        &b"\x00\x00\x00\x08\x00\x00\x00\x00"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x00\x00\x00\x02",
    ] {
        let mut s = TcpStream::connect(env.addr).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let codes = errors_until_closed(&mut s).await;
        assert_eq!(codes.len(), 1, "{garbage:?}");
        assert!(
            codes[0] == "08P01" || codes[0] == "0A000",
            "{garbage:?}: {codes:?}"
        );
    }

    // The bystander's transaction was never disturbed.
    let one: i32 = bystander.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    bystander.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_only_prepared_does_not_hold_the_connection() {
    let env = Env::with(crate::harness::Options {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    // Parse + Describe + Flush, as asyncpg prepares, then idle: no Sync.
    let mut a = raw_login(&env).await;
    let mut out = BytesMut::new();
    let frontend = |out: &mut BytesMut| {
        use postgres_protocol::message::frontend as f;
        f::parse("stmt_a", "SELECT $1::int4 + 1", [23], out).unwrap();
        f::describe(b'S', "stmt_a", out).unwrap();
        f::flush(out);
    };
    frontend(&mut out);
    a.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let mut tags = Vec::new();
    while tags.last() != Some(&b'T') {
        tags.push(read_frame(&mut a, &mut buf).await.unwrap().tag());
    }
    assert_eq!(tags, b"1tT");

    // The only server connection is free for someone else.
    let b = env.client().await;
    let two: i32 = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        b.query_one("SELECT 2", &[]),
    )
    .await
    .expect("not blocked behind the idle client")
    .unwrap()
    .get(0);
    assert_eq!(two, 2);

    // And the prepared statement still works for the first client.
    out.clear();
    postgres_protocol::message::frontend::bind(
        "",
        "stmt_a",
        [1],
        [41i32],
        |v, buf| {
            buf.extend_from_slice(&v.to_be_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        [1],
        &mut out,
    )
    .map_err(|_| ())
    .unwrap();
    postgres_protocol::message::frontend::execute("", 0, &mut out).unwrap();
    postgres_protocol::message::frontend::sync(&mut out);
    a.write_all(&out).await.unwrap();
    let mut value = None;
    loop {
        let frame = read_frame(&mut a, &mut buf).await.unwrap();
        match frame.tag() {
            b'D' => value = Some(i32::from_be_bytes(frame.body()[6..10].try_into().unwrap())),
            b'Z' => break,
            b'E' => panic!("error: {:?}", ErrorFields::decode(frame.body())),
            _ => {}
        }
    }
    assert_eq!(value, Some(42));
}
