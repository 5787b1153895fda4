//! N clients updating the same resource with If-Match never lose an update: every acknowledged
//! update is a distinct version and its change is present in the final resource.

use fhirmesh_testkit::{TestServer, status_and_json};
use serde_json::{Value, json};

const CLIENTS: usize = 8;
const UPDATES_PER_CLIENT: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_updates_from_many_clients_lose_nothing() {
    let server = TestServer::start().await;
    let (_, created) = server.create(&json!({ "resourceType": "Basic", "code": { "text": "counter" } })).await;
    let id = created["id"].as_str().expect("id").to_owned();

    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (client_http, url) = (server.client.clone(), server.url(&format!("Basic/{id}")));
        clients.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut conflicts = 0usize;
            while acknowledged.len() < UPDATES_PER_CLIENT {
                assert!(conflicts < 10_000, "client {client} starved");
                let (status, current) = status_and_json(client_http.get(&url).send().await.expect("read")).await;
                assert_eq!(status, 200);
                let version = current["meta"]["versionId"].as_str().expect("versionId").to_owned();
                let mark = format!("client-{client}-update-{}", acknowledged.len());
                let mut next = current.clone();
                let marks = next["identifier"].as_array().cloned().unwrap_or_default();
                let mut marks: Vec<Value> = marks;
                marks.push(json!({ "value": mark }));
                next["identifier"] = Value::Array(marks);
                let response = client_http
                    .put(&url)
                    .header("content-type", "application/fhir+json")
                    .header("if-match", format!("W/\"{version}\""))
                    .body(next.to_string())
                    .send()
                    .await
                    .expect("update");
                match response.status().as_u16() {
                    200 => {
                        let (_, body) = status_and_json(response).await;
                        let new_version: u64 = body["meta"]["versionId"].as_str().expect("v").parse().expect("number");
                        assert_eq!(new_version, version.parse::<u64>().expect("number") + 1);
                        acknowledged.push((new_version, mark));
                    }
                    412 => conflicts += 1,
                    other => panic!("unexpected status {other}"),
                }
            }
            acknowledged
        }));
    }
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await.expect("client task"));
    }

    let (_, last) = server.get(&format!("Basic/{id}")).await;
    let final_version: u64 = last["meta"]["versionId"].as_str().expect("v").parse().expect("number");
    assert_eq!(final_version as usize, 1 + CLIENTS * UPDATES_PER_CLIENT, "one version per acknowledged update");
    let mut versions: Vec<u64> = all.iter().map(|(v, _)| *v).collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), CLIENTS * UPDATES_PER_CLIENT, "no version acknowledged twice");
    let marks: Vec<&str> =
        last["identifier"].as_array().expect("marks").iter().filter_map(|i| i["value"].as_str()).collect();
    for (_, mark) in &all {
        assert!(marks.contains(&mark.as_str()), "lost update {mark}");
    }
    server.stop().await;
}
