//! WebSocket message load for the proxy benchmark (`benches/load.py`): opens `--connections`
//! WebSocket connections to an echo endpoint (the demo backend's `/ws`, directly or through a
//! proxy), keeps `--inflight` messages outstanding on each, and prints one JSON line with the
//! messages echoed back. A load generator of its own because a Python client spends more CPU
//! per message than the proxies it measures.
//!
//! ```sh
//! cargo build --release --example ws_load
//! target/release/examples/ws_load --addr 127.0.0.1:8080 --host b1.hangar.localhost \
//!     --header "Authorization: Bearer v1...." --connections 50 --inflight 4 --duration 8
//! ```
//!
//! Frames are written by hand: binary, final, masked with the all-zero key (allowed by RFC 6455
//! §5.3, and the payload stays as it is), `--size` bytes each. A message counts when its echo
//! has been read whole. Every message a connection owes is written in one `write` after each
//! read, so a proxy sees the batches a busy client sends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
struct Args {
    /// Where to connect (host:port).
    #[arg(long)]
    addr: SocketAddr,
    /// The `Host` of the upgrade request.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// The upgrade request's target.
    #[arg(long, default_value = "/ws")]
    path: String,
    /// Extra request header lines (`Name: value`), repeatable.
    #[arg(long)]
    header: Vec<String>,
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Messages outstanding per connection.
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Seconds of load after every connection has switched protocols.
    #[arg(long, default_value_t = 8.0)]
    duration: f64,
}

/// One client frame: FIN + binary, masked with a zero key, `size` payload bytes.
fn frame(size: usize) -> Vec<u8> {
    let mut f = vec![0x82];
    match size {
        0..=125 => f.push(0x80 | size as u8),
        126..=0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(size as u16).to_be_bytes());
        }
        _ => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(size as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0; 4]);
    f.resize(f.len() + size, b'x');
    f
}

/// The length of the first whole server frame in `buf` and whether it is a data frame, or
/// `None` if `buf` does not hold one yet.
fn server_frame(buf: &[u8]) -> Option<(usize, bool)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    if masked {
        at += 4;
    }
    let total = at + len;
    let opcode = b0 & 0x0f;
    (buf.len() >= total).then_some((total, matches!(opcode, 0x0..=0x2)))
}

async fn connect(args: &Args) -> std::io::Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(args.addr).await?;
    s.set_nodelay(true)?;
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        args.path, args.host
    );
    for h in &args.header {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        if s.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::other("closed during the handshake"));
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]);
            if !head.starts_with("HTTP/1.1 101") {
                return Err(std::io::Error::other(format!("no upgrade: {head}")));
            }
            buf.drain(..end + 4);
            return Ok((s, buf));
        }
    }
}

async fn run(
    mut s: TcpStream,
    mut buf: Vec<u8>,
    args: Arc<Args>,
    start: Arc<tokio::sync::Barrier>,
    done: Arc<AtomicU64>,
    stop: Arc<std::sync::OnceLock<Instant>>,
) -> std::io::Result<()> {
    let one = frame(args.size);
    start.wait().await;
    let deadline = *stop.get().expect("set before the barrier opens");
    let mut out = one.repeat(args.inflight);
    let mut count = 0u64;
    loop {
        s.write_all(&out).await?;
        out.clear();
        while out.is_empty() {
            if s.read_buf(&mut buf).await? == 0 {
                return Err(std::io::Error::other("the server closed the connection"));
            }
            let mut at = 0;
            while let Some((len, data)) = server_frame(&buf[at..]) {
                at += len;
                if data {
                    count += 1;
                    out.extend_from_slice(&one);
                }
            }
            buf.drain(..at);
        }
        if Instant::now() >= deadline {
            done.fetch_add(count, Ordering::Relaxed);
            return Ok(());
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Arc::new(Args::parse());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        let mut conns = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            match connect(&args).await {
                Ok(c) => conns.push(c),
                Err(e) => {
                    eprintln!("ws_load: cannot open a WebSocket at {}: {e}", args.addr);
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
        let start = Arc::new(tokio::sync::Barrier::new(args.connections + 1));
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::OnceLock::new());
        let mut tasks = tokio::task::JoinSet::new();
        for (s, buf) in conns {
            tasks.spawn(run(
                s,
                buf,
                args.clone(),
                start.clone(),
                done.clone(),
                stop.clone(),
            ));
        }
        let began = Instant::now();
        let _ = stop.set(began + Duration::from_secs_f64(args.duration));
        start.wait().await;
        let mut failed = 0;
        while let Some(r) = tasks.join_next().await {
            if let Ok(Err(e)) | Err(e) = r.map_err(std::io::Error::other) {
                eprintln!("ws_load: {e}");
                failed += 1;
            }
        }
        let secs = began.elapsed().as_secs_f64();
        let messages = done.load(Ordering::Relaxed);
        println!(
            "{{\"messages\": {messages}, \"seconds\": {secs:.3}, \"per_sec\": {:.1}, \"failed\": {failed}}}",
            messages as f64 / secs
        );
        if failed > 0 {
            std::process::ExitCode::FAILURE
        } else {
            std::process::ExitCode::SUCCESS
        }
    })
}
