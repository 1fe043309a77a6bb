//! The small HTTP/1.1 pieces the node's ingress, the gateway's API, the CLI and the tests share: a
//! server loop over hyper, a one-request client, and JSON string escaping. Not a web framework:
//! when an API outgrows a `match` on method and path, move it to axum.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tracing::debug;

/// Bounds of an HTTP server on a device: connections at once, time to send the headers (also how
/// long an idle kept-alive connection is held), time to send a body, and bytes of bodies buffered
/// across every request in flight.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers.
    pub header_timeout: std::time::Duration,
    /// Time a client has to send a request's body.
    pub body_timeout: std::time::Duration,
    /// Bytes of request bodies buffered at once, over all requests.
    pub max_buffered_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 256,
            header_timeout: std::time::Duration::from_secs(5),
            body_timeout: std::time::Duration::from_secs(30),
            max_buffered_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Bytes of bodies buffered now, against a bound: a request takes what it holds and gives it back
/// when its guard drops.
#[derive(Debug)]
pub struct ByteBudget {
    used: std::sync::atomic::AtomicUsize,
    max: usize,
}

/// Bytes taken from a [`ByteBudget`], given back on drop.
#[derive(Debug)]
pub struct BudgetGuard {
    budget: std::sync::Arc<ByteBudget>,
    bytes: usize,
}

impl ByteBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(ByteBudget {
            used: std::sync::atomic::AtomicUsize::new(0),
            max,
        })
    }

    /// Takes `bytes` if they fit.
    pub fn take(self: &std::sync::Arc<Self>, bytes: usize) -> Option<BudgetGuard> {
        use std::sync::atomic::Ordering;
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.checked_add(bytes).filter(|n| *n <= self.max)?;
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(BudgetGuard {
                        budget: self.clone(),
                        bytes,
                    });
                }
                Err(now) => used = now,
            }
        }
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl BudgetGuard {
    /// Takes `more` bytes into this guard if they fit.
    pub fn grow(&mut self, more: usize) -> bool {
        match self.budget.take(more) {
            Some(mut extra) => {
                self.bytes += std::mem::take(&mut extra.bytes);
                true
            }
            None => false,
        }
    }
}

impl BudgetGuard {
    /// Counts `more` bytes that are already held (a reply that arrived), even past the bound: new
    /// requests are refused until they are given back.
    pub fn hold(&mut self, more: usize) {
        self.budget
            .used
            .fetch_add(more, std::sync::atomic::Ordering::AcqRel);
        self.bytes += more;
    }
}

/// A response body that gives its bytes back to a [`ByteBudget`] only once it is written (or the
/// client goes): a client that stops reading holds its share, and new requests see it. Or a body
/// streamed from a channel (a streamed call's answer), which holds no budget: its memory is the
/// channel's few chunks.
#[derive(Debug)]
pub struct GuardedBody {
    inner: Inner,
    _guard: Option<BudgetGuard>,
}

#[derive(Debug)]
enum Inner {
    Full(Full<Bytes>),
    Streamed(ChannelBody),
}

impl GuardedBody {
    /// `body`, holding `guard` until it is sent.
    pub fn new(body: Bytes, guard: Option<BudgetGuard>) -> Self {
        GuardedBody {
            inner: Inner::Full(Full::new(body)),
            _guard: guard,
        }
    }

    /// A body streamed from `body`'s channel.
    pub fn streamed(body: ChannelBody) -> Self {
        GuardedBody {
            inner: Inner::Streamed(body),
            _guard: None,
        }
    }
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        match &mut self.get_mut().inner {
            Inner::Full(full) => std::pin::Pin::new(full)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|e: Infallible| match e {}))),
            Inner::Streamed(body) => std::pin::Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(full) => full.is_end_stream(),
            Inner::Streamed(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match &self.inner {
            Inner::Full(full) => full.size_hint(),
            Inner::Streamed(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// Chunks a streamed body holds at most between its producer and its reader.
pub const CHANNEL_CHUNKS: usize = 4;

/// What feeds a [`ChannelBody`]: chunks (`Ok(Some(chunk))`), then `Ok(None)` for the end. An error,
/// or the sender dropped before the end, cuts the body short.
pub type BodySender = tokio::sync::mpsc::Sender<Result<Option<Bytes>, std::io::Error>>;

/// An HTTP body fed chunk by chunk through a bounded channel: what a streamed call carries to and
/// from HTTP. It ends cleanly only when told so: a producer that fails or goes away before the end
/// cuts the body with an error, so the other side sees it cut (a chunked body without its last
/// chunk, a connection closed), never whole.
#[derive(Debug)]
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Option<Bytes>, std::io::Error>>,
    done: bool,
}

impl ChannelBody {
    /// A body and the sender that feeds it (at most [`CHANNEL_CHUNKS`] chunks ahead).
    pub fn channel() -> (BodySender, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_CHUNKS);
        (tx, ChannelBody { rx, done: false })
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(Some(chunk)))) => {
                Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
            }
            Poll::Ready(Some(Ok(None))) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(Some(Err(std::io::Error::other("the body was cut short"))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        self.budget
            .used
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Binds `addr` and serves HTTP/1.1 with `handler`, within `limits`, until `stop` changes;
/// returns the bound address.
pub async fn serve_http<F, Fut, B>(
    addr: SocketAddr,
    limits: &HttpLimits,
    mut stop: watch::Receiver<bool>,
    handler: F,
) -> std::io::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let refusals = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let header_timeout = limits.header_timeout;
    // A client that stops reading an answer is cut off after the body deadline: what the answer
    // holds is given back.
    let write_timeout = limits.body_timeout;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.changed() => return,
            };
            let (mut stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    debug!("http: accept failed: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                        _ = stop.changed() => return,
                    }
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Over the bound: say so and close, without reading a byte (a few at a time;
                // past that, just close).
                debug!("http: too many connections, refusing {peer}");
                if let Ok(writing) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_secs(1),
                            stream.write_all(TOO_MANY_CONNECTIONS),
                        )
                        .await;
                        drop(writing);
                    });
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(&handler);
                let io = TokioIo::new(WriteDeadline::new(stream, write_timeout));
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .max_buf_size(64 * 1024)
                    .serve_connection(io, service)
                    .await
                {
                    debug!("http connection ended: {e}");
                }
                drop(slot);
            });
        }
    });
    Ok(bound)
}

/// A stream whose writes fail once one has waited longer than a deadline (the peer stopped
/// reading): hyper has no write timeout of its own.
struct WriteDeadline<T> {
    inner: T,
    limit: std::time::Duration,
    waiting: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(inner: T, limit: std::time::Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            waiting: None,
        }
    }

    /// Passes a write's (or flush's) outcome on; while it is pending the deadline runs, and a
    /// write that waited past it fails with TimedOut. Any progress disarms the deadline.
    fn bounded<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: std::task::Poll<std::io::Result<R>>,
    ) -> std::task::Poll<std::io::Result<R>> {
        if poll.is_ready() {
            self.waiting = None;
            return poll;
        }
        let limit = self.limit;
        let sleep = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if sleep.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        std::task::Poll::Pending
    }
}

use std::future::Future as _;

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bounded(cx, poll)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.bounded(cx, poll)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

const TOO_MANY_CONNECTIONS: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
x-starling-status: unavailable\r\nconnection: close\r\ncontent-length: 38\r\n\r\n\
too many connections: try again later\n";

/// One HTTP/1.1 request on a new connection: `(status, headers, body)`.
pub async fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let code = resp.status().as_u16();
    let head = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((code, head, body))
}

/// Posts one call to a node's ingress: `(HTTP status, x-starling-status, body)`.
pub async fn post(
    ingress: SocketAddr,
    service: &str,
    method: &str,
    body: Bytes,
    timeout_ms: Option<u64>,
) -> Result<(u16, Option<String>, Bytes), String> {
    let timeout = timeout_ms.map(|ms| ms.to_string());
    let headers: Vec<(&str, &str)> = timeout
        .iter()
        .map(|t| ("x-starling-timeout-ms", t.as_str()))
        .collect();
    let (code, head, body) = request(
        "POST",
        ingress,
        &format!("/v1/call/{service}/{method}"),
        &headers,
        body,
    )
    .await?;
    let status = head
        .get("x-starling-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((code, status, body))
}

/// A plain-text answer.
pub fn plain(code: u16, text: &'static str) -> Response<Full<Bytes>> {
    respond(
        code,
        "text/plain; charset=utf-8",
        Bytes::from_static(text.as_bytes()),
    )
}

/// A JSON answer.
pub fn json(code: u16, body: String) -> Response<Full<Bytes>> {
    respond(code, "application/json", Bytes::from(body))
}

/// An answer with a content type.
pub fn respond(code: u16, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() =
        hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_channel_body_ends_only_when_told_and_a_vanished_producer_cuts_it() {
        let (tx, body) = ChannelBody::channel();
        tx.send(Ok(Some(Bytes::from_static(b"ab"))))
            .await
            .expect("send");
        tx.send(Ok(None)).await.expect("send");
        drop(tx);
        let whole = body.collect().await.expect("a whole body").to_bytes();
        assert_eq!(whole, Bytes::from_static(b"ab"));

        let (tx, body) = ChannelBody::channel();
        tx.send(Ok(Some(Bytes::from_static(b"ab"))))
            .await
            .expect("send");
        drop(tx);
        let cut = body.collect().await.expect_err("cut short");
        assert!(cut.to_string().contains("cut short"), "{cut}");
    }
}
