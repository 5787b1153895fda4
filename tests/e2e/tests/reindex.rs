//! `fhirmesh reindex` beside a running server: on OpenSearch the rebuild fills a new index
//! generation while searches keep answering in full, then switches them at once; on the embedded
//! index it refills in place. Either way, every write — before and during the rebuild — is found
//! afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fhirmesh_testkit::{TestServer, status_and_json, unique_name, use_opensearch};
use serde_json::json;

/// Creates `count` Patients of `family`.
async fn create_patients(server: &TestServer, family: &str, count: usize) {
    for n in 0..count {
        let (status, body) = server
            .create(&json!({"resourceType": "Patient", "name": [{"family": family, "given": [format!("g{n}")]}]}))
            .await;
        assert_eq!(status, 201, "{body}");
    }
}

/// How many Patients of `family` a search finds (status and total).
async fn count(server: &TestServer, family: &str) -> (u16, Option<u64>) {
    let url = server.url(&format!("Patient?family={family}&_total=accurate&_count=1"));
    let (status, bundle) = status_and_json(server.client.get(url).send().await.expect("search sent")).await;
    (status, bundle["total"].as_u64())
}

/// Runs `fhirmesh reindex` for `server`'s configuration on a thread of its own (it runs its own
/// runtime), as the command line would.
fn reindex(server: &TestServer) -> std::thread::JoinHandle<Result<(), String>> {
    let config = server.config.clone();
    std::thread::spawn(move || fhirmesh::reindex::run(&config, Duration::ZERO).map_err(|e| format!("{e:#}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opensearch_reindex_never_interrupts_searches_and_switches_generation() {
    let server = TestServer::start_with(use_opensearch).await;
    let family = unique_name("Reindex");
    create_patients(&server, &family, 40).await;
    assert_eq!(count(&server, &family).await, (200, Some(40)));

    let done = Arc::new(AtomicBool::new(false));
    let searches = tokio::spawn({
        let (client, url, done) = (
            server.client.clone(),
            server.url(&format!("Patient?family={family}&_total=accurate&_count=1")),
            done.clone(),
        );
        async move {
            let mut answered = 0;
            while !done.load(Ordering::Acquire) {
                let (status, bundle) = status_and_json(client.get(&url).send().await.expect("search sent")).await;
                assert_eq!(status, 200, "{bundle}");
                let total = bundle["total"].as_u64().expect("a total");
                assert!(total >= 40, "a search during the reindex found {total} of at least 40");
                answered += 1;
            }
            answered
        }
    });
    let rebuild = reindex(&server);
    // Writes during the rebuild.
    create_patients(&server, &family, 10).await;
    let outcome = tokio::task::spawn_blocking(move || rebuild.join().expect("reindex thread")).await.expect("join");
    done.store(true, Ordering::Release);
    outcome.expect("reindex succeeds");
    assert!(searches.await.expect("searches") > 0);

    assert_eq!(count(&server, &family).await, (200, Some(50)));
    // The search alias now points at the second generation, and the first one is gone.
    let (url, prefix) = (&server.config.opensearch.url, &server.config.opensearch.prefix);
    let aliases: serde_json::Value = server
        .client
        .get(format!("{url}/{prefix}-g*/_alias"))
        .send()
        .await
        .expect("aliases")
        .json()
        .await
        .expect("json");
    let indices: Vec<&String> = aliases.as_object().expect("indices").keys().collect();
    assert_eq!(indices, vec![&format!("{prefix}-g2-patient")], "{aliases}");
    assert_eq!(aliases[format!("{prefix}-g2-patient")]["aliases"], json!({format!("{prefix}-r-patient"): {}}));

    // And new writes are found in it.
    create_patients(&server, &family, 1).await;
    assert_eq!(count(&server, &family).await, (200, Some(51)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_reindex_refills_the_index_in_place() {
    let server = TestServer::start().await;
    let family = unique_name("Refill");
    create_patients(&server, &family, 25).await;
    let outcome = tokio::task::spawn_blocking({
        let rebuild = reindex(&server);
        move || rebuild.join().expect("reindex thread")
    })
    .await
    .expect("join");
    outcome.expect("reindex succeeds");
    assert_eq!(count(&server, &family).await, (200, Some(25)));
    create_patients(&server, &family, 1).await;
    assert_eq!(count(&server, &family).await, (200, Some(26)));
    server.stop().await;
}
