//! The query protocols through the proxy: simple, extended, COPY, cancel,
//! errors inside transactions, large rows.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::SimpleQueryMessage;

use crate::harness::{eventually, sqlstate, Env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries() {
    let env = Env::start().await;
    let client = env.client().await;

    let messages = client
        .simple_query("SELECT 1 AS a; SELECT 'x' AS b, NULL AS c")
        .await
        .unwrap();
    let rows: Vec<Vec<Option<String>>> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        rows,
        vec![vec![Some("1".into())], vec![Some("x".into()), None]]
    );

    let row = client
        .query_one("SELECT $1::int4 + 1, $2::text || '!'", &[&41i32, &"hi"])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i32>(0), row.get::<_, String>(1)),
        (42, "hi!".to_owned())
    );

    // Empty query, notices and ParameterStatus pass through.
    client.batch_execute("").await.unwrap();
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        .await
        .unwrap();
    client
        .batch_execute("SET application_name = 'e2e'")
        .await
        .unwrap();
    let name: String = client
        .query_one("SHOW application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "e2e");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_100k_rows() {
    let env = Env::start().await;
    let client = env.client().await;
    client
        .batch_execute("CREATE TABLE copy_t (id int PRIMARY KEY, name text)")
        .await
        .unwrap();

    let sink = client
        .copy_in("COPY copy_t (id, name) FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..100_000 {
        chunk.push_str(&format!("{i}\tname-{i}\n"));
        if chunk.len() > 64 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk)))
                .await
                .unwrap();
        }
    }
    sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 100_000);

    let count: i64 = client
        .query_one("SELECT count(*) FROM copy_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 100_000);

    let stream = client.copy_out("COPY copy_t TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(bytes).unwrap();
    assert_eq!(text.lines().count(), 100_000);
    assert!(text.contains("99999\tname-99999\n"));

    // A COPY that fails on bad data: the error arrives and the session goes on.
    let sink = client
        .copy_in("COPY copy_t (id, name) FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(sqlstate(&err), "22P02");
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_right_backend() {
    let env = Env::start().await;
    let client = env.client().await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.query("SELECT pg_sleep(60)", &[]).await });

    let direct = env.direct().await;
    let started = eventually(Duration::from_secs(10), || async {
        let rows = direct
            .query("SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'", &[])
            .await
            .unwrap();
        !rows.is_empty()
    })
    .await;
    assert!(started, "the query reached the server");

    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancelled in time")
        .unwrap();
    let err = result.expect_err("the query was cancelled");
    assert_eq!(sqlstate(&err), "57014");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_inside_a_transaction_then_rollback() {
    let env = Env::start().await;
    let mut client = env.client().await;
    client
        .batch_execute("CREATE TABLE tx_t (id int)")
        .await
        .unwrap();

    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO tx_t VALUES (1)", &[])
        .await
        .unwrap();
    let err = tx.query_one("SELECT 1 / 0", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "22012");
    let err = tx.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(
        sqlstate(&err),
        "25P02",
        "in a failed transaction until rollback"
    );
    tx.rollback().await.unwrap();

    let count: i64 = client
        .query_one("SELECT count(*) FROM tx_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "the insert was rolled back");

    // Errors in the extended protocol outside a transaction; then the session goes on.
    let err = client
        .query("SELECT * FROM no_such_table", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42P01");
    let err = client
        .simple_query("SELECT 1; SELECT 1/0; SELECT 2")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "22012");
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_100_mb_stream_through() {
    let env = Env::start().await;
    let client = env.client().await;
    const LEN: i32 = 100 * 1024 * 1024 + 7;
    let row = client
        .query_one("SELECT repeat('x', $1) AS big, 'after' AS tail", &[&LEN])
        .await
        .unwrap();
    let big: &str = row.get(0);
    assert_eq!(big.len(), LEN as usize);
    assert!(big.bytes().all(|b| b == b'x'));
    assert_eq!(row.get::<_, &str>(1), "after");

    // And in: a 100 MB parameter, then read back its length.
    client
        .batch_execute("CREATE TABLE big_t (v text)")
        .await
        .unwrap();
    let value = "y".repeat(100 * 1024 * 1024);
    client
        .execute("INSERT INTO big_t VALUES ($1)", &[&value])
        .await
        .unwrap();
    let len: i32 = client
        .query_one("SELECT length(v) FROM big_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(len as usize, value.len());
}

/// A client that asks for another encoding is told so in PostgreSQL's name
/// for it, and gets its text in that encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_encoding_is_reported_as_postgresql_names_it() {
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use wire::Frame;

    let env = Env::start().await;
    let mut stream = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [
            ("user", "trusted"),
            ("database", "db"),
            ("client_encoding", "iso-8859-1"),
        ],
        &mut out,
    )
    .unwrap();
    // 'é' in LATIN1 is the single byte 0xE9.
    let sql: &[u8] = b"SELECT '\xE9'::text\0";
    out.extend_from_slice(b"Q");
    out.extend_from_slice(&(4 + sql.len() as i32).to_be_bytes());
    out.extend_from_slice(sql);
    stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let (mut reported, mut value, mut ready) = (None, None, 0);
    while ready < 2 {
        let frame = loop {
            if let Some(frame) = Frame::decode(&mut buf, 1 << 20).unwrap() {
                break frame;
            }
            assert!(stream.read_buf(&mut buf).await.unwrap() > 0, "closed");
        };
        match frame.tag() {
            b'S' => {
                let (name, v) = wire::backend::parameter_status(frame.body()).unwrap();
                if name == b"client_encoding" {
                    reported = Some(String::from_utf8_lossy(v).into_owned());
                }
            }
            b'D' => value = wire::rows::data_row(frame.body()).unwrap()[0].map(<[u8]>::to_vec),
            b'E' => panic!(
                "error: {:?}",
                wire::backend::ErrorFields::decode(frame.body())
            ),
            b'Z' => ready += 1,
            _ => {}
        }
    }
    assert_eq!(reported.as_deref(), Some("LATIN1"));
    assert_eq!(value, Some(vec![0xE9]));
}
