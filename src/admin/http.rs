//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process
//! is alive) and `/readyz` (accepting clients). Requests are parsed with
//! httparse; one request per connection.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::listener::Proxy;

/// Serves the endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), respond(stream, proxy))
                .await;
        });
    }
}

async fn respond(mut stream: TcpStream, proxy: Arc<Proxy>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let path = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => break request.path.unwrap_or("/").to_owned(),
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => continue,
            _ => {
                return write(
                    &mut stream,
                    "400 Bad Request",
                    "text/plain",
                    "bad request\n",
                )
                .await
            }
        }
    };
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            proxy.refresh_gauges();
            let body = super::metrics::install()
                .map(|h| h.render())
                .unwrap_or_default();
            write(&mut stream, "200 OK", "text/plain; version=0.0.4", &body).await
        }
        "/healthz" => write(&mut stream, "200 OK", "text/plain", "ok\n").await,
        "/readyz" => {
            let (status, body) = if proxy.is_draining() {
                ("503 Service Unavailable", "draining\n")
            } else if !proxy.upstream_reachable().await {
                ("503 Service Unavailable", "upstream unreachable\n")
            } else {
                ("200 OK", "ready\n")
            };
            write(&mut stream, status, "text/plain", body).await
        }
        _ => write(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
    }
}

async fn write(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
