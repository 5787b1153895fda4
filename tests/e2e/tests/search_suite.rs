//! Runs the search conformance suite (`tests/e2e/data/search_suite.json`) over HTTP against the
//! embedded server loaded with every R4 spec example plus the suite's own resources. The suite is
//! data so that other backends (OpenSearch) run the very same cases.

use std::collections::BTreeSet;

use fhirmesh_fhir::examples::{SCHEMA_REJECTS, spec_examples};
use fhirmesh_testkit::{TestServer, status_and_json};
use futures::StreamExt;
use serde_json::Value;

const SUITE: &str = include_str!("../data/search_suite.json");

async fn put_all(server: &TestServer, resources: Vec<Value>) {
    let results = futures::stream::iter(resources)
        .map(|resource| async move {
            let key = format!(
                "{}/{}",
                resource["resourceType"].as_str().unwrap_or(""),
                resource["id"].as_str().unwrap_or("")
            );
            let response = server
                .client
                .put(server.url(&key))
                .header("content-type", "application/fhir+json")
                .body(resource.to_string())
                .send()
                .await
                .expect("sent");
            (key, response.status().as_u16())
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for (key, status) in results {
        assert!(status == 200 || status == 201, "loading {key} answered {status}");
    }
}

fn key_of(entry: &Value) -> String {
    let resource = &entry["resource"];
    format!("{}/{}", resource["resourceType"].as_str().unwrap_or(""), resource["id"].as_str().unwrap_or(""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_conformance_suite() {
    let suite: Value = serde_json::from_str(SUITE).expect("suite is JSON");
    let server = TestServer::start_with(|c| c.storage.durable = false).await;
    let examples: Vec<Value> = spec_examples()
        .filter(|e| {
            let key = format!("{}/{}", e["resourceType"].as_str().unwrap_or(""), e["id"].as_str().unwrap_or(""));
            !SCHEMA_REJECTS.iter().any(|(rejected, _)| *rejected == key)
        })
        .collect();
    put_all(&server, examples).await;
    put_all(&server, suite["resources"].as_array().expect("resources").clone()).await;

    let mut failures = Vec::new();
    for case in suite["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let query = case["query"].as_str().expect("query");
        let mut request = server.client.get(server.url(query));
        if case["strict"].as_bool() == Some(true) {
            request = request.header("prefer", "handling=strict");
        }
        let (status, mut bundle) = status_and_json(request.send().await.expect("sent")).await;
        if let Some(expected) = case["status"].as_u64() {
            if u64::from(status) != expected || bundle["resourceType"] != "OperationOutcome" {
                failures.push(format!("{name}: expected {expected} with an OperationOutcome, got {status}: {bundle}"));
            }
            continue;
        }
        if status != 200 {
            failures.push(format!("{name}: {query} answered {status}: {bundle}"));
            continue;
        }
        if let Some(total) = case["total"].as_u64()
            && bundle["total"].as_u64() != Some(total)
        {
            failures.push(format!("{name}: total {} instead of {total}", bundle["total"]));
        }
        if case["total_absent"].as_bool() == Some(true) && bundle.get("total").is_some() {
            failures.push(format!("{name}: a total {} where none was asked for", bundle["total"]));
        }
        let mut matches = Vec::new();
        let mut includes = BTreeSet::new();
        let mut warnings = Vec::new();
        let mut pages = 0;
        loop {
            pages += 1;
            for entry in bundle["entry"].as_array().cloned().unwrap_or_default() {
                match entry["search"]["mode"].as_str() {
                    Some("match") => matches.push(key_of(&entry)),
                    Some("include") => {
                        includes.insert(key_of(&entry));
                    }
                    Some("outcome") => warnings.push(entry["resource"].to_string()),
                    other => failures.push(format!("{name}: entry with search mode {other:?}")),
                }
            }
            let next = bundle["link"]
                .as_array()
                .and_then(|links| links.iter().find(|l| l["relation"] == "next"))
                .and_then(|l| l["url"].as_str())
                .map(str::to_owned);
            match next {
                Some(url) if pages < 50 => {
                    let (status, page) = status_and_json(server.client.get(&url).send().await.expect("sent")).await;
                    assert_eq!(status, 200, "{name}: next page {url}");
                    bundle = page;
                }
                _ => break,
            }
        }
        let expected: Vec<String> =
            case["expect"].as_array().expect("expect").iter().map(|v| v.as_str().expect("key").to_owned()).collect();
        let ordered = case["ordered"].as_bool() == Some(true);
        let matched_as_expected = if ordered {
            matches == expected
        } else {
            matches.iter().collect::<BTreeSet<_>>() == expected.iter().collect::<BTreeSet<_>>()
                && matches.len() == expected.len()
        };
        if !matched_as_expected {
            failures.push(format!("{name}: {query}\n    expected {expected:?}\n    got      {matches:?}"));
        }
        if let Some(expected_includes) = case["include"].as_array() {
            let expected: BTreeSet<String> =
                expected_includes.iter().map(|v| v.as_str().expect("key").to_owned()).collect();
            if includes != expected {
                failures.push(format!("{name}: includes {includes:?} instead of {expected:?}"));
            }
        }
        if let Some(pages_expected) = case["pages"].as_u64()
            && pages != pages_expected
        {
            failures.push(format!("{name}: {pages} pages instead of {pages_expected}"));
        }
        if let Some(warning) = case["warning"].as_str()
            && !warnings.iter().any(|w| w.contains(warning))
        {
            failures.push(format!("{name}: no warning naming {warning}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        suite["cases"].as_array().map_or(0, Vec::len),
        failures.join("\n")
    );
    server.stop().await;
}
