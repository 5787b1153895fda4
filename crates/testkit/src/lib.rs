//! Test fixtures for fhirmesh.
//!
//! [`TestServer`] starts the same composition `fhirmesh serve` runs (gateway + resource + relay on
//! SQLite), in-process, on 127.0.0.1 port 0 with a fresh temporary data directory, so tests talk
//! real HTTP to real wiring. Not for production use.
//!
//! `FHIRMESH_TEST_STORE=dynamodb` runs every [`TestServer`] on the DynamoDB store instead, in a
//! fresh table of the DynamoDB API at `FHIRMESH_TEST_AWS_ENDPOINT` (moto, started by
//! `tools/testinfra/with-infra.sh`): the same HTTP suite, another backend.
//! `FHIRMESH_TEST_INDEX=opensearch` likewise puts the search index in OpenSearch
//! (`FHIRMESH_TEST_OPENSEARCH_URL`), under a fresh index prefix dropped again on [`TestServer::stop`].

use std::path::Path;

use fhirmesh::{Config, Running, Target};
pub use fhirmesh_testinfra::{aws_endpoint, nats_url, opensearch_url, unique_name};
use serde_json::Value;

/// A running in-process fhirmesh, stopped on [`TestServer::stop`].
pub struct TestServer {
    /// FHIR base URL, e.g. `http://127.0.0.1:41234`.
    pub base: String,
    pub client: reqwest::Client,
    /// The configuration the server runs with.
    pub config: Config,
    running: Option<Running>,
    data_dir: tempfile::TempDir,
    /// The OpenSearch url and index prefix this server used, to drop its indices at the end.
    opensearch: Option<(String, String)>,
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
        use_test_store(&mut config);
        adjust(&mut config);
        config.validate().expect("test configuration is valid");
        let running = fhirmesh::serve::start(&config, Target::All).await.expect("fhirmesh starts");
        let addr = running.http_addr.expect("embedded mode serves HTTP");
        let opensearch = (config.search.backend == fhirmesh::config::SearchBackend::Opensearch)
            .then(|| (config.opensearch.url.clone(), config.opensearch.prefix.clone()));
        TestServer {
            base: format!("http://{addr}{}", config.server.base_path),
            client: reqwest::Client::new(),
            config,
            running: Some(running),
            data_dir,
            opensearch,
        }
    }

    /// Stops every service and starts them again on the same data directory and configuration
    /// (a new port): what a process restart does.
    pub async fn restart(mut self) -> TestServer {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("fhirmesh stops cleanly");
        }
        let running = fhirmesh::serve::start(&self.config, Target::All).await.expect("fhirmesh starts again");
        let addr = running.http_addr.expect("embedded mode serves HTTP");
        self.base = format!("http://{addr}{}", self.config.server.base_path);
        self.running = Some(running);
        self
    }

    /// Whether this run tests the DynamoDB store (`FHIRMESH_TEST_STORE=dynamodb`).
    pub fn on_dynamodb() -> bool {
        std::env::var("FHIRMESH_TEST_STORE").is_ok_and(|store| store == "dynamodb")
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
        if let Some((url, prefix)) = self.opensearch.take() {
            // Many servers share one test node: drop this one's indices (its shards count).
            let indices = format!("{url}/{prefix}-r-*,{prefix}-meta?ignore_unavailable=true");
            let response = self.client.delete(indices).send().await.expect("OpenSearch answers");
            assert!(response.status().is_success(), "dropping the test indices: {}", response.status());
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

    /// GETs a path as FHIR JSON (`Accept: application/fhir+json`; without it a `Binary` would
    /// answer its raw content) and returns (status, body).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let request = self.client.get(self.url(path)).header("accept", "application/fhir+json");
        let response = request.send().await.expect("request sent");
        status_and_json(response).await
    }
}

/// Points `config` at the store and search index this test run is for (see the crate docs).
pub fn use_test_store(config: &mut Config) {
    match std::env::var("FHIRMESH_TEST_STORE").as_deref() {
        Err(_) | Ok("" | "sqlite") => {}
        Ok("dynamodb") => use_dynamodb(config),
        Ok(other) => panic!("FHIRMESH_TEST_STORE={other:?}: expected sqlite or dynamodb"),
    }
    match std::env::var("FHIRMESH_TEST_INDEX").as_deref() {
        Err(_) | Ok("" | "sqlite") => {}
        Ok("opensearch") => use_opensearch(config),
        Ok(other) => panic!("FHIRMESH_TEST_INDEX={other:?}: expected sqlite or opensearch"),
    }
}

/// The search index in fresh indices of the test OpenSearch.
pub fn use_opensearch(config: &mut Config) {
    config.search.backend = fhirmesh::config::SearchBackend::Opensearch;
    config.opensearch.url = opensearch_url();
    config.opensearch.prefix = unique_name("e2e").to_ascii_lowercase();
    // A loaded 2-core machine running many tests at once: give the index the time it needs
    // before a search gives up waiting for its own writes.
    config.resource.consistency_wait_ms = config.resource.consistency_wait_ms.max(60_000);
}

/// Resources in a fresh table of the test DynamoDB API (created at start-up).
pub fn use_dynamodb(config: &mut Config) {
    config.storage.backend = fhirmesh::config::StorageBackend::Dynamodb;
    config.aws.endpoint_url = Some(aws_endpoint());
    config.aws.region = Some("us-east-1".into());
    config.dynamodb.table = unique_name("e2e");
    config.dynamodb.create_table = true;
    // moto answers DynamoDB requests one at a time (see tools/testinfra/moto_serial.py) and slowly
    // on a 2-core machine running many tests at once: give the relay → indexer hop the time it
    // needs there before a search gives up waiting for its own writes.
    config.resource.consistency_wait_ms = 10_000;
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
