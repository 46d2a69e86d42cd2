//! Abuse resistance: slow and greedy clients, floods of guesses and
//! made-up ids. The transport tests serve the real router on a loopback
//! socket through `transport::serve`; the others call the router directly.

mod support;

use api::server::transport::{self, TransportLimits};
use std::net::SocketAddr;
use std::time::Duration;
use support::{Kind, TestApi};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a test waits for something the server must do by itself
/// before it declares a hang (not a timing assertion: the server's own
/// timeouts in these tests are a second or two).
const HANG: Duration = Duration::from_secs(60);

/// A server on a loopback socket with these transport limits.
struct Served {
    address: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<()>,
}

async fn serve(api: &TestApi, limits: TransportLimits) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(transport::serve(
        listener,
        api.server.router(),
        limits,
        async move {
            let _ = stopped.await;
        },
    ));
    Served {
        address,
        stop,
        serving,
    }
}

/// Reads until the server closes the connection (EOF or reset); what it
/// sent first.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(HANG, stream.read(&mut buffer)).await {
            Err(_) => panic!("the server never closed the connection"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// Sends one request on a keep-alive connection and reads its answer's
/// status line and headers (the bodies asked for here are small).
async fn request(stream: &mut TcpStream, text: &str) -> String {
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("\r\n\r\n") {
        let n = tokio::time::timeout(HANG, stream.read(&mut buffer))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed before answering");
        received.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

const HEALTH: &str = "GET /healthz HTTP/1.1\r\nHost: ledger\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_while_others_are_served() {
    let api = TestApi::start(Kind::Sqlite, "slow_clients").await.unwrap();
    let limits = TransportLimits {
        header_read_timeout: Duration::from_secs(1),
        body_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(30),
        connections_max: 64,
        connections_per_address_max: 32,
    };
    let served = serve(&api, limits).await;
    // Slowloris: headers begun and never finished, on several connections.
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(served.address).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: ledger\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    // Meanwhile an honest client is answered.
    let mut honest = TcpStream::connect(served.address).await.unwrap();
    let answer = request(&mut honest, HEALTH).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Every slow connection is closed by the server, without a 200.
    for mut stream in slow {
        let answer = read_until_closed(&mut stream).await;
        assert!(!answer.contains(" 200 "), "{answer}");
    }
    // A body that never finishes gets 408 and the connection is closed.
    let mut dripping = TcpStream::connect(served.address).await.unwrap();
    dripping
        .write_all(
            b"POST /v1/auth/login HTTP/1.1\r\nHost: ledger\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut dripping).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    served.stop.send(()).unwrap();
    tokio::time::timeout(HANG, served.serving)
        .await
        .unwrap()
        .unwrap();
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_address() {
    let api = TestApi::start(Kind::Sqlite, "connection_caps")
        .await
        .unwrap();
    let limits = TransportLimits {
        connections_per_address_max: 3,
        ..TransportLimits::default()
    };
    let served = serve(&api, limits).await;
    // Three keep-alive connections, each known to be accepted: answered.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(served.address).await.unwrap();
        let answer = request(&mut stream, HEALTH).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        open.push(stream);
    }
    // A fourth from the same address is closed unanswered.
    let mut extra = TcpStream::connect(served.address).await.unwrap();
    let _ = extra.write_all(HEALTH.as_bytes()).await;
    let answer = read_until_closed(&mut extra).await;
    assert!(answer.is_empty(), "{answer}");
    // Once one closes, a new connection is served again.
    drop(open.pop());
    let mut served_again = None;
    for _ in 0..100 {
        let mut stream = TcpStream::connect(served.address).await.unwrap();
        if stream.write_all(HEALTH.as_bytes()).await.is_err() {
            continue;
        }
        let answer = read_until_first_bytes(&mut stream).await;
        if answer.starts_with("HTTP/1.1 200") {
            served_again = Some(stream);
            break;
        }
        // The server may not have seen the close yet: try again shortly.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served_again.is_some(), "a freed slot is never given again");
    drop(open);
    served.stop.send(()).unwrap();
    tokio::time::timeout(HANG, served.serving)
        .await
        .unwrap()
        .unwrap();
    api.stop().await;
}

/// The first bytes the server sends, or nothing if it closes.
async fn read_until_first_bytes(stream: &mut TcpStream) -> String {
    let mut buffer = [0u8; 4096];
    match tokio::time::timeout(HANG, stream.read(&mut buffer)).await {
        Err(_) => panic!("no answer and no close"),
        Ok(Ok(n)) => String::from_utf8_lossy(&buffer[..n]).into_owned(),
        Ok(Err(_)) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_and_closes_idle_connections() {
    let api = TestApi::start(Kind::Sqlite, "transport_shutdown")
        .await
        .unwrap();
    let served = serve(&api, TransportLimits::default()).await;
    let mut idle = TcpStream::connect(served.address).await.unwrap();
    let answer = request(&mut idle, HEALTH).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    served.stop.send(()).unwrap();
    // The idle keep-alive connection is closed and serving returns.
    let rest = read_until_closed(&mut idle).await;
    assert!(rest.is_empty(), "{rest}");
    tokio::time::timeout(HANG, served.serving)
        .await
        .unwrap()
        .unwrap();
    api.stop().await;
}
