//! The HTTP/1.1 listener: hyper's own connection builder with a timer, so
//! its header read timeout is live, plus what hyper leaves to the server: a
//! cap on open connections, in total and per client address, a deadline for
//! reading a request body, and a timeout on connections where no byte moves.
//!
//! A slow client (slowloris: headers sent a byte at a time, or never
//! finished) is cut off by the header read timeout; one that opens thousands
//! of connections hits the caps and its extra connections are closed at once.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::Service;

/// Pause after the listener fails to accept (out of file descriptors, say)
/// before it tries again, so a failing accept does not spin.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Most idle checks per idle timeout (how late an idle connection may be
/// closed, as a share of the timeout).
const IDLE_CHECKS_PER_TIMEOUT: u32 = 4;
/// Largest buffer hyper keeps for one connection's reads (bounds what one
/// slow or hostile client can make the server hold).
pub const CONNECTION_BUFFER_BYTES_MAX: usize = 64 * 1024;

/// Transport limits of `ledger serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct TransportLimits {
    /// Longest a client may take to send a request's headers. hyper starts
    /// this timer whenever it waits for a request, so it also closes a
    /// keep-alive connection that sends nothing for this long.
    #[arg(long, env = "LEDGER_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = super::parse_duration)]
    pub header_read_timeout: Duration,
    /// Longest a request body may take to arrive, from the end of its
    /// headers (over it: 408 `request_timeout`, connection closed).
    #[arg(long, env = "LEDGER_BODY_READ_TIMEOUT", default_value = "10s", value_parser = super::parse_duration)]
    pub body_read_timeout: Duration,
    /// Longest a connection may go without a byte read or written in either
    /// direction, whatever it is doing (a stalled upload, a client that
    /// stopped reading its answer); it is then closed. Keep it above
    /// `--request-timeout`, and above the progress stream's 15 s keep-alive.
    #[arg(long, env = "LEDGER_IDLE_TIMEOUT", default_value = "60s", value_parser = super::parse_duration)]
    pub idle_timeout: Duration,
    /// Connections open at once; more are closed as soon as accepted.
    #[arg(long, env = "LEDGER_CONNECTIONS_MAX", default_value_t = 8_192, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections_max: u32,
    /// Connections open at once from one client address; more are closed
    /// as soon as accepted. Many honest users may share an address (a NAT,
    /// a load test), so this is generous.
    #[arg(long, env = "LEDGER_CONNECTIONS_PER_ADDRESS_MAX", default_value_t = 2_048, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections_per_address_max: u32,
}

impl Default for TransportLimits {
    fn default() -> TransportLimits {
        TransportLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            connections_max: 8_192,
            connections_per_address_max: 2_048,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops
/// accepting, lets every connection finish its request in flight (idle ones
/// close at once), and returns when all are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: TransportLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let connections = Arc::new(Semaphore::new(limits.connections_max as usize));
    let addresses = AddressCounts::new(limits.connections_per_address_max);
    let (closing, closing_seen) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, address) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "could not accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Over a cap, the connection is dropped (closed) before anything is
        // read from it: it costs the server one accept.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics::counter!("ledger_connections_refused_total", "reason" => "total").increment(1);
            continue;
        };
        let Some(slot) = addresses.admit(address.ip()) else {
            metrics::counter!("ledger_connections_refused_total", "reason" => "address")
                .increment(1);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            router: router.clone(),
            limits: limits.clone(),
            address,
            closing: closing_seen.clone(),
        };
        tokio::spawn(async move {
            connection.run(stream).await;
            drop((permit, slot));
        });
    }
    drop(listener);
    closing.send_replace(true);
    // Every connection holds one permit until it is closed.
    let _all_closed = connections
        .acquire_many(limits.connections_max)
        .await
        .expect("BUG: the connection semaphore is never closed");
}

/// One accepted connection and what it needs.
struct Connection {
    router: Router,
    limits: TransportLimits,
    address: SocketAddr,
    closing: watch::Receiver<bool>,
}

impl Connection {
    async fn run(mut self, stream: TcpStream) {
        let started = Instant::now();
        let last_activity_ms = Arc::new(AtomicU64::new(0));
        let io = TokioIo::new(Tracked {
            inner: stream,
            started,
            last_activity_ms: last_activity_ms.clone(),
        });
        let (router, address, body_read_timeout) =
            (self.router, self.address, self.limits.body_read_timeout);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request =
                request.map(|body| Body::new(DeadlineBody::new(body, body_read_timeout)));
            request.extensions_mut().insert(ConnectInfo(address));
            router.clone().call(request)
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .keep_alive(true)
            .max_buf_size(CONNECTION_BUFFER_BYTES_MAX);
        let connection = builder.serve_connection(io, service);
        let mut connection = std::pin::pin!(connection);
        let idle_timeout = self.limits.idle_timeout;
        let mut idle_check = tokio::time::interval(idle_timeout / IDLE_CHECKS_PER_TIMEOUT);
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing = *self.closing.borrow();
        if closing {
            connection.as_mut().graceful_shutdown();
        }
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        if error.is_timeout() {
                            metrics::counter!("ledger_connections_timed_out_total", "phase" => "headers").increment(1);
                        }
                        tracing::debug!(%error, %address, "connection ended with an error");
                    }
                    return;
                }
                changed = self.closing.changed(), if !closing => {
                    closing = true;
                    if changed.is_ok() {
                        connection.as_mut().graceful_shutdown();
                    }
                }
                _ = idle_check.tick() => {
                    let idle_ms = elapsed_ms(started).saturating_sub(last_activity_ms.load(Ordering::Relaxed));
                    if Duration::from_millis(idle_ms) >= idle_timeout {
                        metrics::counter!("ledger_connections_timed_out_total", "phase" => "idle").increment(1);
                        tracing::debug!(%address, "closing a connection idle too long");
                        return;
                    }
                }
            }
        }
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Open connections per client address.
#[derive(Clone)]
struct AddressCounts {
    counts: Arc<Mutex<HashMap<IpAddr, u32>>>,
    per_address_max: u32,
}

/// One connection's place in its address's count, given back when dropped.
struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, u32>>>,
    address: IpAddr,
}

impl AddressCounts {
    fn new(per_address_max: u32) -> AddressCounts {
        AddressCounts {
            counts: Arc::new(Mutex::new(HashMap::new())),
            per_address_max,
        }
    }

    /// A slot for one more connection from `address`, unless it has its
    /// maximum open. The map holds only addresses with open connections, so
    /// it is bounded by the total connection cap.
    fn admit(&self, address: IpAddr) -> Option<AddressSlot> {
        let mut counts = self.counts.lock().expect("BUG: address counts poisoned");
        let count = counts.entry(address).or_insert(0);
        if *count >= self.per_address_max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: self.counts.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("BUG: address counts poisoned");
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// A TCP stream that notes when a byte last moved either way.
struct Tracked {
    inner: TcpStream,
    started: Instant,
    last_activity_ms: Arc<AtomicU64>,
}

impl Tracked {
    fn touch(&self) {
        self.last_activity_ms
            .store(elapsed_ms(self.started), Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body that must arrive whole before a deadline, counted from
/// the end of the request's headers.
pub struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// A request body did not arrive within `--body-read-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyReadTimeout;

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|result| result.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            metrics::counter!("ledger_connections_timed_out_total", "phase" => "body").increment(1);
            return Poll::Ready(Some(Err(Box::new(BodyReadTimeout))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a body error (as axum reports it) was the body read deadline.
pub fn is_body_read_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<BodyReadTimeout>() {
            return true;
        }
        current = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_slots_are_counted_and_given_back() {
        let counts = AddressCounts::new(2);
        let address: IpAddr = "127.0.0.2".parse().unwrap();
        let first = counts.admit(address).unwrap();
        let second = counts.admit(address).unwrap();
        assert!(counts.admit(address).is_none());
        assert!(counts.admit("127.0.0.3".parse().unwrap()).is_some());
        drop(first);
        let third = counts.admit(address).unwrap();
        drop((second, third));
        assert!(counts.counts.lock().unwrap().is_empty());
    }
}
