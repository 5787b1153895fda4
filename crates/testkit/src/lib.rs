//! Test fixtures for fhirmesh.
//!
//! [`TestServer`] starts the same composition `fhirmesh serve` runs (gateway + resource + relay on
//! SQLite), in-process, on 127.0.0.1 port 0 with a fresh temporary data directory, so tests talk
//! real HTTP to real wiring. Not for production use.

use std::path::Path;

use fhirmesh::{Config, Running, Target};
use serde_json::Value;

/// A running in-process fhirmesh, stopped on [`TestServer::stop`].
pub struct TestServer {
    /// FHIR base URL, e.g. `http://127.0.0.1:41234`.
    pub base: String,
    pub client: reqwest::Client,
    running: Option<Running>,
    data_dir: tempfile::TempDir,
}

impl TestServer {
    /// Embedded mode with default configuration.
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// Embedded mode; `adjust` edits the configuration before start (listen and data dir are set
    /// by the fixture).
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let data_dir = tempfile::tempdir().expect("temporary data directory");
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".into();
        config.storage.data_dir = data_dir.path().to_path_buf();
        adjust(&mut config);
        config.validate().expect("test configuration is valid");
        let running = fhirmesh::serve::start(&config, Target::All).await.expect("fhirmesh starts");
        let addr = running.http_addr.expect("embedded mode serves HTTP");
        TestServer {
            base: format!("http://{addr}{}", config.server.base_path),
            client: reqwest::Client::new(),
            running: Some(running),
            data_dir,
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("clean shutdown");
        }
    }

    /// POSTs a resource and returns (status, body).
    pub async fn create(&self, resource: &Value) -> (u16, Value) {
        let rtype = resource["resourceType"].as_str().unwrap_or("Unknown");
        let response = self
            .client
            .post(self.url(rtype))
            .header("content-type", "application/fhir+json")
            .body(resource.to_string())
            .send()
            .await
            .expect("request sent");
        status_and_json(response).await
    }

    /// GETs a path and returns (status, body).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.expect("request sent");
        status_and_json(response).await
    }
}

/// Status and JSON body (Null when the body is empty).
pub async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("response body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|err| panic!("response is not JSON ({err}): {}", String::from_utf8_lossy(&bytes)))
    };
    (status, body)
}

/// Asserts `body` is an OperationOutcome with at least one error issue, returning the first
/// issue's diagnostics and expression.
pub fn expect_outcome(body: &Value) -> (String, Option<String>) {
    assert_eq!(body["resourceType"], "OperationOutcome", "not an OperationOutcome: {body}");
    let issue = &body["issue"][0];
    assert!(matches!(issue["severity"].as_str(), Some("error" | "fatal")), "first issue is not an error: {body}");
    let diagnostics = issue["diagnostics"].as_str().unwrap_or_default().to_owned();
    assert!(!diagnostics.is_empty(), "issue has no diagnostics: {body}");
    let expression = issue["expression"][0].as_str().map(str::to_owned);
    (diagnostics, expression)
}

/// A copy of `resource` without `meta.versionId`/`meta.lastUpdated` (and without `meta` when
/// nothing else was in it), for comparing what was sent with what is stored.
pub fn without_volatile_meta(resource: &Value) -> Value {
    let mut out = resource.clone();
    if let Some(meta) = out.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            out.as_object_mut().map(|o| o.remove("meta"));
        }
    }
    out
}
