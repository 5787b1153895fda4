//! Every R4 spec example (npm hl7.fhir.r4.examples@4.0.1, derived into crates/fhir/data) is created
//! through HTTP, read back, and equals what was sent apart from the id and `meta.versionId` /
//! `meta.lastUpdated`. Examples the official schema itself rejects are listed in
//! crates/fhir/data/SCHEMA_REJECTS.md and must be refused with a 400 OperationOutcome instead.

use fhirmesh_fhir::examples::spec_examples;
use fhirmesh_testkit::{TestServer, expect_outcome, without_volatile_meta};
use futures::StreamExt;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spec_example_round_trips_through_http() {
    // No notifier: it would (rightly) turn the example Subscriptions whose `end` has passed `off`,
    // and this test reads back exactly what it wrote.
    let server = TestServer::start_with(|c| {
        c.storage.durable = false;
        c.notifier.enabled = false;
    })
    .await;
    let examples: Vec<Value> = spec_examples().collect();
    assert!(examples.len() > 500, "the example set is complete ({} examples)", examples.len());
    let rejected_by_schema = fhirmesh_fhir::examples::SCHEMA_REJECTS;

    let results = futures::stream::iter(examples.iter().cloned())
        .map(|example| {
            let server = &server;
            async move {
                let rtype = example["resourceType"].as_str().unwrap_or_default().to_owned();
                let id = example["id"].as_str().unwrap_or_default().to_owned();
                // PUT keeps the example's own id, so references between examples stay meaningful.
                let url = if id.is_empty() { server.url(&rtype) } else { server.url(&format!("{rtype}/{id}")) };
                let request = if id.is_empty() { server.client.post(url) } else { server.client.put(url) };
                let response = request
                    .header("content-type", "application/fhir+json")
                    .body(example.to_string())
                    .send()
                    .await
                    .expect("sent");
                let status = response.status().as_u16();
                let body: Value = response.json().await.expect("JSON body");
                (rtype, id, example, status, body)
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;

    let mut failures = Vec::new();
    let mut round_tripped = 0;
    for (rtype, id, example, status, body) in results {
        let key = format!("{rtype}/{id}");
        if rejected_by_schema.iter().any(|(name, _)| *name == key) {
            if status != 400 {
                failures.push(format!("{key}: the schema rejects it, expected 400, got {status}"));
            } else {
                expect_outcome(&body);
            }
            continue;
        }
        if status != 201 && status != 200 {
            failures.push(format!("{key}: create answered {status}: {body}"));
            continue;
        }
        let stored_id = body["id"].as_str().unwrap_or_default().to_owned();
        let (status, read) = server.get(&format!("{rtype}/{stored_id}")).await;
        if status != 200 {
            failures.push(format!("{key}: read answered {status}"));
            continue;
        }
        let mut expected = without_volatile_meta(&example);
        let mut actual = without_volatile_meta(&read);
        if id.is_empty() {
            expected.as_object_mut().map(|o| o.remove("id"));
            actual.as_object_mut().map(|o| o.remove("id"));
        }
        if expected != actual {
            failures.push(format!("{key}: read back differs from what was sent"));
            continue;
        }
        round_tripped += 1;
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(round_tripped + rejected_by_schema.len(), examples.len());
    server.stop().await;
}
