//! `tcp_forward LISTEN SERVER [WORKER_THREADS]`: the floor under any tokio
//! proxy. Each client gets its own server connection and bytes are copied
//! both ways, with no pooling, no parsing, nothing counted: what a proxy
//! built the way Shardline is (tokio, a task per client on a worker of
//! [`proxy::workers`], a `select!` over both sockets) costs before doing
//! any work of its own. `benches/pgbench-compare.sh` runs it beside the
//! proxies with `FLOOR=1`.
//!
//! WORKER_THREADS as Shardline's `worker_threads`: 0 (the default) is
//! Shardline's default count, 1 a single event loop.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BUFFER_BYTES: usize = 8192;

async fn forward(mut client: TcpStream, server: SocketAddr) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut server = TcpStream::connect(server).await?;
    server.set_nodelay(true)?;
    let (mut client_rd, mut client_wr) = client.split();
    let (mut server_rd, mut server_wr) = server.split();
    let mut up = vec![0u8; BUFFER_BYTES];
    let mut down = vec![0u8; BUFFER_BYTES];
    loop {
        tokio::select! {
            n = client_rd.read(&mut up) => match n? {
                0 => return Ok(()),
                n => server_wr.write_all(&up[..n]).await?,
            },
            n = server_rd.read(&mut down) => match n? {
                0 => return Ok(()),
                n => client_wr.write_all(&down[..n]).await?,
            },
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: tcp_forward LISTEN SERVER [WORKER_THREADS]";
    let listen: SocketAddr = args.next().context(usage)?.parse().context(usage)?;
    let server: SocketAddr = args.next().context(usage)?.parse().context(usage)?;
    let threads: u32 = args.next().map_or(Ok(0), |t| t.parse()).context(usage)?;
    let workers = proxy::workers::Workers::start(threads)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (client, _) = listener.accept().await?;
            workers.serve(client, move |client| async move {
                let _ = forward(client, server).await;
            });
        }
    })
}
