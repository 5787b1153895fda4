//! OpenSearch going away and coming back, through the whole server: while it is unreachable a
//! search answers 503 with Retry-After (never a 500, never a stale "nothing found"), writes go on
//! being accepted, and once it is back the indexer catches up with every write made meanwhile.
//! OpenSearch is the test node of `tools/testinfra/with-infra.sh`, reached through a proxy the
//! test cuts and restores.

use std::sync::Arc;
use std::time::Duration;

use fhirmesh_testkit::{TestServer, opensearch_url, status_and_json, use_opensearch};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy to OpenSearch that can be cut (every connection dropped, new ones refused) and
/// restored. Stops with the test's runtime.
struct Proxy {
    addr: std::net::SocketAddr,
    up: Arc<watch::Sender<bool>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (up, _) = watch::channel(true);
        let up = Arc::new(up);
        let state = up.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut up = state.subscribe();
                if !*up.borrow() {
                    continue; // dropped: the client sees the connection closed
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = up.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy { addr, up }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

async fn family_search(server: &TestServer, family: &str) -> (u16, Option<String>, serde_json::Value) {
    let response =
        server.client.get(server.url(&format!("Patient?family={family}"))).send().await.expect("request sent");
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (status, body) = status_and_json(response).await;
    (status, retry_after, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_is_unavailable_while_opensearch_is_down_and_no_write_is_lost() {
    let upstream = opensearch_url();
    let proxy = Proxy::start(upstream.trim_start_matches("http://").to_owned()).await;
    let server = TestServer::start_with(|config| {
        use_opensearch(config);
        config.opensearch.url = proxy.url();
        config.resource.consistency_wait_ms = 2_000;
    })
    .await;

    let (status, _) = server.create(&json!({"resourceType": "Patient", "name": [{"family": "Before"}]})).await;
    assert_eq!(status, 201);
    let (status, _, bundle) = family_search(&server, "Before").await;
    assert_eq!((status, bundle["total"].as_u64()), (200, Some(1)), "{bundle}");

    proxy.set_up(false);
    for family in ["During", "During"] {
        let (status, body) = server.create(&json!({"resourceType": "Patient", "name": [{"family": family}]})).await;
        assert_eq!(status, 201, "writes do not depend on the search index: {body}");
    }
    let (status, retry_after, body) = family_search(&server, "Before").await;
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some(), "a 503 says when to retry");
    let (diagnostics, _) = fhirmesh_testkit::expect_outcome(&body);
    assert!(diagnostics.contains("unavailable"), "{diagnostics}");

    proxy.set_up(true);
    // The indexer retries on its own; give it a bounded while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, bundle) = family_search(&server, "During").await;
        if status == 200 && bundle["total"].as_u64() == Some(2) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the index did not catch up: {status} {bundle}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _, bundle) = family_search(&server, "Before").await;
    assert_eq!((status, bundle["total"].as_u64()), (200, Some(1)), "{bundle}");
    server.stop().await;
}
