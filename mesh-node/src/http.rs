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

/// Binds `addr` and serves HTTP/1.1 with `handler` until `stop` changes; returns the bound address.
pub async fn serve_http<F, Fut>(
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
    handler: F,
) -> std::io::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.changed() => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(&handler);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("http connection ended: {e}");
                }
            });
        }
    });
    Ok(bound)
}

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
