//! A minimal HTTP/1.1 client for load generation: one kept-alive connection per worker, no pool
//! logic, no redirects, no TLS — what is measured is the server, not the client. Only plain
//! `http://host:port` base URLs (the benchmark rule: loopback only, though any address works).

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `http://host:port[/base/path]`, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `host:port` to connect to.
    pub authority: String,
    /// Path prefix without a trailing slash (`""` or `/fhir`).
    pub path: String,
}

impl BaseUrl {
    /// The path of an absolute URL under this base, relative to it (for URLs the server gave out).
    pub fn relative<'a>(&self, url: &'a str) -> Option<&'a str> {
        let rest = url.strip_prefix("http://")?.strip_prefix(self.authority.as_str())?;
        rest.strip_prefix(self.path.as_str())?.strip_prefix('/')
    }

    pub fn parse(url: &str) -> Result<BaseUrl> {
        let rest =
            url.strip_prefix("http://").with_context(|| format!("'{url}': only http:// base URLs are supported"))?;
        let (authority, path) = match rest.split_once('/') {
            Some((authority, path)) => (authority, format!("/{}", path.trim_end_matches('/'))),
            None => (rest, String::new()),
        };
        if authority.is_empty() {
            bail!("'{url}' has no host");
        }
        let authority = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
        Ok(BaseUrl { authority, path: if path == "/" { String::new() } else { path } })
    }

    /// The request target for `path` relative to the FHIR base (`Patient/1`, `?_type=…`, ``).
    pub fn target(&self, path: &str) -> String {
        if path.is_empty() {
            format!("{}/", self.path)
        } else {
            format!("{}/{}", self.path, path.trim_start_matches('/'))
        }
    }
}

/// A response: status, the headers a tool needs, and the body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub location: Option<String>,
    pub etag: Option<String>,
    pub consistency_token: Option<String>,
    /// `Content-Location` (an async kick-off's status URL).
    pub content_location: Option<String>,
    pub body: Bytes,
}

/// One kept-alive HTTP/1.1 connection.
pub struct Connection {
    base: BaseUrl,
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    pub async fn open(base: &BaseUrl) -> Result<Connection> {
        let stream = TcpStream::connect(&base.authority)
            .await
            .with_context(|| format!("cannot connect to {}", base.authority))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "benchmark connection closed");
            }
        });
        Ok(Connection { base: base.clone(), sender })
    }

    /// The base URL this connection talks to.
    pub fn base(&self) -> &BaseUrl {
        &self.base
    }

    /// Sends a request (`body` as FHIR JSON when given) and reads the whole response.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        prefer: Option<&str>,
    ) -> Result<Response> {
        self.sender.ready().await.context("connection closed")?;
        let mut request = Request::builder()
            .method(method)
            .uri(self.base.target(path))
            .header(http::header::HOST, &self.base.authority)
            .header(http::header::ACCEPT, "application/fhir+json");
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/fhir+json");
        }
        if let Some(prefer) = prefer {
            request = request.header("prefer", prefer);
        }
        let request = request.body(Full::new(body.unwrap_or_default()))?;
        let response = self.sender.send_request(request).await?;
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let (status, location, etag, consistency_token, content_location) = (
            response.status(),
            header("location"),
            header("etag"),
            header("x-consistency-token"),
            header("content-location"),
        );
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Response { status, location, etag, consistency_token, content_location, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let base = BaseUrl::parse("http://127.0.0.1:8080").expect("base");
        assert_eq!((base.authority.as_str(), base.path.as_str()), ("127.0.0.1:8080", ""));
        assert_eq!(base.target("Patient/1"), "/Patient/1");
        assert_eq!(base.target(""), "/");
        let base = BaseUrl::parse("http://localhost:9/fhir/").expect("base");
        assert_eq!((base.authority.as_str(), base.path.as_str()), ("localhost:9", "/fhir"));
        assert_eq!(base.target("Patient?x=1"), "/fhir/Patient?x=1");
        assert_eq!(BaseUrl::parse("http://example.org").expect("base").authority, "example.org:80");
        assert!(BaseUrl::parse("https://example.org").is_err());
        assert!(BaseUrl::parse("http://").is_err());
        let base = BaseUrl::parse("http://127.0.0.1:8080/fhir").expect("base");
        assert_eq!(base.relative("http://127.0.0.1:8080/fhir/$export-status/j"), Some("$export-status/j"));
        assert_eq!(base.relative("http://other:1/fhir/x"), None);
    }
}
