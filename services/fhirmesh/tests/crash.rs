//! A write acknowledged before `kill -9` of the server is readable after a restart.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

const WRITERS: usize = 8;
/// Upper bound on writes per writer; the kill normally comes long before.
const MAX_WRITES_PER_WRITER: usize = 2_000;
const KILL_AFTER_ACKS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..2 {
        let server = support::spawn(&["--listen", "127.0.0.1:0"], Some(dir.path())).await;
        let base = server.address.clone();
        let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let client = reqwest::Client::new();

        let mut writers = Vec::new();
        for writer in 0..WRITERS {
            let (client, base, acked) = (client.clone(), base.clone(), acked.clone());
            writers.push(tokio::spawn(async move {
                for n in 0..MAX_WRITES_PER_WRITER {
                    let body = json!({ "resourceType": "Basic", "code": { "text": format!("round {round} writer {writer} #{n}") } });
                    let sent = client
                        .post(format!("{base}/Basic"))
                        .header("content-type", "application/fhir+json")
                        .body(body.to_string())
                        .send()
                        .await;
                    // Once the server is killed, requests fail: stop writing.
                    let Ok(response) = sent else { return };
                    if response.status() != 201 {
                        return;
                    }
                    let Ok(created) = response.json::<Value>().await else { return };
                    let id = created["id"].as_str().expect("id").to_owned();
                    acked.lock().expect("lock").insert(id, 1);
                }
            }));
        }
        tokio::time::timeout(Duration::from_secs(120), async {
            while acked.lock().expect("lock").len() < KILL_AFTER_ACKS {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("enough writes acknowledged within 120 s");
        server.kill_9().await;
        for writer in writers {
            writer.await.expect("writer task");
        }

        let acked = acked.lock().expect("lock").clone();
        let server = support::spawn(&["--listen", "127.0.0.1:0"], Some(dir.path())).await;
        for id in acked.keys() {
            let response = client.get(format!("{}/Basic/{id}", server.address)).send().await.expect("read");
            assert_eq!(response.status(), 200, "acknowledged write Basic/{id} lost in round {round}");
        }
        // The index converges too: every acknowledged write is found by search after the restart.
        let mut acked_ids: Vec<&String> = acked.keys().collect();
        acked_ids.sort();
        for chunk in acked_ids.chunks(50) {
            let ids: Vec<&str> = chunk.iter().map(|s| s.as_str()).collect();
            let url = format!("{}/Basic?_id={}&_count=100", server.address, ids.join(","));
            let bundle: Value = client.get(url).send().await.expect("search").json().await.expect("json");
            let found = bundle["entry"].as_array().map_or(0, Vec::len);
            assert_eq!(found, chunk.len(), "search misses acknowledged writes after the restart in round {round}");
        }
        let status = server.terminate().await;
        assert!(status.success(), "graceful shutdown exits 0, got {status}");
    }
}
