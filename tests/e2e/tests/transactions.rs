//! Transaction and batch Bundles (`POST /`) over HTTP against the embedded server: urn:uuid and
//! conditional references, every kind of entry, all-or-nothing on failure, concurrent conflicting
//! transactions, batches with independent failures, malformed bundles, and the R4 spec examples.

use std::collections::HashSet;

use fhirmesh_testkit::{TestServer, expect_outcome, status_and_json};
use serde_json::{Value, json};

async fn post_bundle(server: &TestServer, bundle: &Value, prefer: Option<&str>) -> (u16, Value) {
    let mut request = server.client.post(server.url("")).header("content-type", "application/fhir+json");
    if let Some(prefer) = prefer {
        request = request.header("prefer", prefer);
    }
    status_and_json(request.body(bundle.to_string()).send().await.expect("sent")).await
}

fn transaction(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

fn batch(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "batch", "entry": entries})
}

fn post(full_url: &str, resource: Value) -> Value {
    json!({"fullUrl": full_url, "resource": resource, "request": {"method": "POST", "url": resource_type(&resource)}})
}

fn resource_type(resource: &Value) -> String {
    resource["resourceType"].as_str().expect("resourceType").to_owned()
}

fn statuses(response: &Value) -> Vec<String> {
    response["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["response"]["status"].as_str().expect("status").to_owned())
        .collect()
}

/// `Type/id` of an entry's `response.location` (`Type/id/_history/n`).
fn target(response: &Value, index: usize) -> String {
    let location = response["entry"][index]["response"]["location"].as_str().expect("location");
    location.split("/_history").next().expect("path").to_owned()
}

/// Every version of every resource, newest first (the change log as clients see it).
async fn system_history(server: &TestServer) -> Vec<String> {
    let (status, body) = server.get("_history?_count=1000").await;
    assert_eq!(status, 200, "{body}");
    body["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| format!("{} {}", e["fullUrl"].as_str().unwrap_or_default(), e["response"]["etag"]))
        .collect()
}

#[tokio::test]
async fn urn_uuid_references_are_rewritten_everywhere() {
    let server = TestServer::start().await;
    let patient = "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0";
    let encounter = "urn:uuid:7a3e2f36-93a0-4a5e-a9d4-6f1e8e2a1f10";
    let bundle = transaction(vec![
        post(
            encounter,
            json!({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
                   "subject": {"reference": patient}}),
        ),
        post(
            "urn:uuid:5f2f8d3e-1f6c-4e8e-9d8a-2b3c4d5e6f70",
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "heart rate"},
                   "subject": {"reference": patient}, "encounter": {"reference": encounter},
                   "extension": [{"url": "http://example.org/x", "valueReference": {"reference": patient}}],
                   "contained": [{"resourceType": "Provenance", "id": "p1", "recorded": "2024-01-01T00:00:00Z",
                                  "agent": [{"who": {"reference": patient}}], "target": [{"reference": encounter}]}],
                   "text": {"status": "generated",
                            "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\"><a href=\"{patient}\">the patient</a></div>")}}),
        ),
        post(patient, json!({"resourceType": "Patient", "name": [{"family": "Chain"}]})),
    ]);
    let (status, response) = post_bundle(&server, &bundle, None).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["type"], "transaction-response");
    assert_eq!(statuses(&response), ["201 Created", "201 Created", "201 Created"]);
    let (encounter_ref, observation_ref, patient_ref) =
        (target(&response, 0), target(&response, 1), target(&response, 2));
    assert!(patient_ref.starts_with("Patient/") && encounter_ref.starts_with("Encounter/"));
    // Representation by default: the stored resources, with the references rewritten.
    assert_eq!(response["entry"][1]["resource"]["subject"]["reference"], patient_ref.as_str());
    let (_, observation) = server.get(&observation_ref).await;
    assert_eq!(observation["subject"]["reference"], patient_ref.as_str());
    assert_eq!(observation["encounter"]["reference"], encounter_ref.as_str());
    assert_eq!(observation["extension"][0]["valueReference"]["reference"], patient_ref.as_str());
    assert_eq!(observation["contained"][0]["agent"][0]["who"]["reference"], patient_ref.as_str());
    assert_eq!(observation["contained"][0]["target"][0]["reference"], encounter_ref.as_str());
    assert!(observation["text"]["div"].as_str().expect("div").contains(&format!("href=\"{patient_ref}\"")));
    let (_, encounter) = server.get(&encounter_ref).await;
    assert_eq!(encounter["subject"]["reference"], patient_ref.as_str());
    // The index saw the whole transaction: the new Observation is found through its patient.
    let patient_id = patient_ref.trim_start_matches("Patient/");
    let (_, found) = server.get(&format!("Observation?subject={patient_id}")).await;
    assert_eq!(found["total"], 1, "{found}");
    server.stop().await;
}

#[tokio::test]
async fn every_kind_of_entry_in_one_transaction() {
    let server = TestServer::start().await;
    let (_, kept) = server
        .create(
            &json!({"resourceType": "Patient", "identifier": [{"system": "urn:t", "value": "kept"}], "active": true}),
        )
        .await;
    let (_, doomed) = server.create(&json!({"resourceType": "Patient", "name": [{"family": "Doomed"}]})).await;
    let (_, patched) = server.create(&json!({"resourceType": "Patient", "name": [{"family": "Before"}]})).await;
    let (kept_id, doomed_id, patched_id) =
        (kept["id"].as_str().expect("id"), doomed["id"].as_str().expect("id"), patched["id"].as_str().expect("id"));
    let json_patch = base64_encode(br#"[{"op": "replace", "path": "/name/0/family", "value": "After"}]"#);
    let bundle = transaction(vec![
        // GET first in the bundle, answered last: it sees the transaction's update.
        json!({"request": {"method": "GET", "url": format!("Patient/{kept_id}")}}),
        json!({"resource": {"resourceType": "Patient", "id": kept_id, "active": false,
                            "identifier": [{"system": "urn:t", "value": "kept"}]},
               "request": {"method": "PUT", "url": format!("Patient/{kept_id}"), "ifMatch": "W/\"1\""}}),
        json!({"request": {"method": "DELETE", "url": format!("Patient/{doomed_id}")}}),
        json!({"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": json_patch},
               "request": {"method": "PATCH", "url": format!("Patient/{patched_id}")}}),
        // Conditional create that matches: resolves to the existing resource, writes nothing.
        json!({"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
               "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:t", "value": "kept"}]},
               "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:t|kept"}}),
        // Conditional update with no match: a create.
        json!({"resource": {"resourceType": "Patient", "identifier": [{"system": "urn:t", "value": "new"}]},
               "request": {"method": "PUT", "url": "Patient?identifier=urn:t|new"}}),
        // Refers to the conditional create's fullUrl: becomes the existing Patient.
        post(
            "urn:uuid:22222222-2222-4222-8222-222222222222",
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                    "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"}}),
        ),
        json!({"request": {"method": "GET", "url": "Patient?identifier=urn:t|new"}}),
    ]);
    let (status, response) = post_bundle(&server, &bundle, None).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(
        statuses(&response),
        ["200 OK", "200 OK", "204 No Content", "200 OK", "200 OK", "201 Created", "201 Created", "200 OK"]
    );
    assert_eq!(response["entry"][0]["resource"]["active"], false, "the GET sees the PUT");
    assert_eq!(response["entry"][0]["response"]["etag"], "W/\"2\"");
    assert_eq!(response["entry"][3]["resource"]["name"][0]["family"], "After");
    assert_eq!(target(&response, 4), format!("Patient/{kept_id}"));
    assert_eq!(response["entry"][6]["resource"]["subject"]["reference"], format!("Patient/{kept_id}"));
    let searchset = &response["entry"][7]["resource"];
    assert_eq!(searchset["type"], "searchset");
    assert_eq!(searchset["total"], 1);
    assert_eq!(server.get(&format!("Patient/{doomed_id}")).await.0, 410);
    assert_eq!(server.get(&format!("Patient/{patched_id}")).await.1["name"][0]["family"], "After");
    server.stop().await;
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn a_failing_last_entry_rolls_back_everything() {
    let server = TestServer::start().await;
    let (_, existing) = server.create(&json!({"resourceType": "Patient", "name": [{"family": "Untouched"}]})).await;
    let existing_id = existing["id"].as_str().expect("id");
    let history_before = system_history(&server).await;
    let bundle = transaction(vec![
        post(
            "urn:uuid:33333333-3333-4333-8333-333333333333",
            json!({"resourceType": "Patient", "identifier": [{"system": "urn:rollback", "value": "1"}]}),
        ),
        json!({"resource": {"resourceType": "Patient", "id": existing_id, "name": [{"family": "Changed"}]},
               "request": {"method": "PUT", "url": format!("Patient/{existing_id}")}}),
        // Invalid: gender must be a code string.
        post("urn:uuid:44444444-4444-4444-8444-444444444444", json!({"resourceType": "Patient", "gender": 42})),
    ]);
    let (status, body) = post_bundle(&server, &bundle, None).await;
    assert_eq!(status, 400, "{body}");
    let (_, expression) = expect_outcome(&body);
    assert_eq!(expression.as_deref(), Some("Bundle.entry[2].resource.gender"), "{body}");
    // Store, history, index and change log unchanged.
    assert_eq!(system_history(&server).await, history_before);
    assert_eq!(server.get(&format!("Patient/{existing_id}")).await.1["name"][0]["family"], "Untouched");
    let (_, found) = server.get("Patient?identifier=urn:rollback|1").await;
    assert_eq!(found["total"], 0, "{found}");
    server.stop().await;
}

#[tokio::test]
async fn conditional_references_resolve_to_exactly_one_match() {
    let server = TestServer::start().await;
    let (_, org) = server
        .create(&json!({"resourceType": "Organization", "identifier": [{"system": "urn:org", "value": "1"}], "name": "One"}))
        .await;
    for _ in 0..2 {
        server
            .create(&json!({"resourceType": "Organization", "identifier": [{"system": "urn:org", "value": "twin"}]}))
            .await;
    }
    let with_org = |reference: &str| {
        transaction(vec![
            post("urn:uuid:55555555-5555-4555-8555-555555555555", json!({"resourceType": "Patient", "active": true})),
            post(
                "urn:uuid:66666666-6666-4666-8666-666666666666",
                json!({"resourceType": "Patient", "managingOrganization": {"reference": reference}}),
            ),
        ])
    };
    let (status, response) = post_bundle(&server, &with_org("Organization?identifier=urn:org|1"), None).await;
    assert_eq!(status, 200, "{response}");
    let stored = server.get(&target(&response, 1)).await.1;
    assert_eq!(
        stored["managingOrganization"]["reference"],
        format!("Organization/{}", org["id"].as_str().expect("id"))
    );
    let history = system_history(&server).await;
    for (reference, why) in
        [("Organization?identifier=urn:org|none", "no match"), ("Organization?identifier=urn:org|twin", "two matches")]
    {
        let (status, body) = post_bundle(&server, &with_org(reference), None).await;
        assert_eq!(status, 412, "{why}: {body}");
        let (message, expression) = expect_outcome(&body);
        assert!(message.contains(reference), "{why}: {message}");
        assert_eq!(expression.as_deref(), Some("Bundle.entry[1].resource"), "{why}");
    }
    assert_eq!(system_history(&server).await, history, "failed transactions wrote nothing");
    server.stop().await;
}

#[tokio::test]
async fn concurrent_conflicting_transactions_lose_no_update() {
    let server = TestServer::start().await;
    let (_, counter) = server.create(&json!({"resourceType": "Patient", "name": [{"family": "Counter"}]})).await;
    let id = counter["id"].as_str().expect("id").to_owned();
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let (client, base, id) = (server.client.clone(), server.url(""), id.clone());
        tasks.push(tokio::spawn(async move {
            let mut succeeded = 0;
            for round in 0..5 {
                // Unconditional: the server serialises them (re-planning after a lost race).
                let bundle = transaction(vec![
                    json!({"resource": {"resourceType": "Patient", "id": id, "name": [{"family": format!("w{writer}r{round}")}]},
                           "request": {"method": "PUT", "url": format!("Patient/{id}")}}),
                    post("urn:uuid:77777777-7777-4777-8777-777777777777",
                         json!({"resourceType": "Observation", "status": "final", "code": {"text": format!("w{writer}r{round}")},
                                "subject": {"reference": format!("Patient/{id}")}})),
                ]);
                let response = client
                    .post(&base)
                    .header("content-type", "application/fhir+json")
                    .body(bundle.to_string())
                    .send()
                    .await
                    .expect("sent");
                let (status, body) = status_and_json(response).await;
                match status {
                    200 => succeeded += 1,
                    409 => {}
                    other => panic!("unexpected {other}: {body}"),
                }
            }
            succeeded
        }));
    }
    let mut succeeded = 0;
    for task in tasks {
        succeeded += task.await.expect("writer");
    }
    assert!(succeeded > 0);
    let (_, current) = server.get(&format!("Patient/{id}")).await;
    assert_eq!(current["meta"]["versionId"], (1 + succeeded).to_string(), "one version per committed transaction");
    let (_, observations) = server.get(&format!("Observation?subject=Patient/{id}&_total=accurate&_count=0")).await;
    assert_eq!(observations["total"], succeeded, "every committed transaction wrote both entries, no other did");
    server.stop().await;
}

#[tokio::test]
async fn if_match_in_a_transaction_fails_it_cleanly() {
    let server = TestServer::start().await;
    let (_, patient) = server.create(&json!({"resourceType": "Patient", "active": true})).await;
    let id = patient["id"].as_str().expect("id");
    let bundle = transaction(vec![
        post("urn:uuid:88888888-8888-4888-8888-888888888888", json!({"resourceType": "Patient", "active": false})),
        json!({"resource": {"resourceType": "Patient", "id": id, "active": false},
               "request": {"method": "PUT", "url": format!("Patient/{id}"), "ifMatch": "W/\"7\""}}),
    ]);
    let history = system_history(&server).await;
    let (status, body) = post_bundle(&server, &bundle, None).await;
    assert_eq!(status, 412, "{body}");
    assert_eq!(expect_outcome(&body).1.as_deref(), Some("Bundle.entry[1].request.ifMatch"));
    assert_eq!(system_history(&server).await, history);
    server.stop().await;
}

#[tokio::test]
async fn large_transactions_commit_whole_and_race_whole() {
    let server = TestServer::start().await;
    // More writes than one DynamoDB transaction holds (33): on that backend the staged protocol.
    const N: usize = 60;
    let patient_url = "urn:uuid:aaaaaaaa-0000-4000-8000-000000000000";
    let mut entries = vec![post(patient_url, json!({"resourceType": "Patient", "name": [{"family": "Large"}]}))];
    entries.extend((1..=N).map(|i| {
        post(
            &format!("urn:uuid:aaaaaaaa-0000-4000-8000-{i:012}"),
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "large"},
                   "subject": {"reference": patient_url}}),
        )
    }));
    let (status, body) = post_bundle(&server, &transaction(entries), None).await;
    assert_eq!(status, 200, "{body}");
    let patient = target(&body, 0);
    let observations: Vec<String> = (1..=N).map(|i| target(&body, i)).collect();
    let (_, found) = server.get(&format!("Observation?subject={patient}&_count=100&_summary=count")).await;
    assert_eq!(found["total"], N, "{found}");

    // Two large updates of the same resources at once, each expecting version 1: one wins, whole.
    let update = |tag: &str| {
        transaction(
            observations
                .iter()
                .map(|reference| {
                    let id = reference.split('/').nth(1).expect("id");
                    json!({"resource": {"resourceType": "Observation", "id": id, "status": "amended",
                                        "code": {"text": tag}, "subject": {"reference": patient}},
                           "request": {"method": "PUT", "url": reference, "ifMatch": "W/\"1\""}})
                })
                .collect(),
        )
    };
    let (first, second) = (update("first"), update("second"));
    let (a, b) = tokio::join!(post_bundle(&server, &first, None), post_bundle(&server, &second, None));
    let winner = match (a.0, b.0) {
        (200, 409 | 412) => "first",
        (409 | 412, 200) => "second",
        other => panic!("exactly one transaction must win: {other:?}\n{}\n{}", a.1, b.1),
    };
    for reference in &observations {
        let (status, observation) = server.get(reference).await;
        assert_eq!(status, 200);
        assert_eq!(observation["meta"]["versionId"], "2", "{observation}");
        assert_eq!(observation["code"]["text"], winner, "no mix of the two transactions: {observation}");
    }
    server.stop().await;
}

#[tokio::test]
async fn batch_entries_succeed_and_fail_independently() {
    let server = TestServer::start().await;
    let (_, existing) =
        server.create(&json!({"resourceType": "Patient", "identifier": [{"system": "urn:b", "value": "1"}]})).await;
    let id = existing["id"].as_str().expect("id");
    let bundle = batch(vec![
        json!({"resource": {"resourceType": "Patient", "active": true}, "request": {"method": "POST", "url": "Patient"}}),
        json!({"resource": {"resourceType": "Patient", "birthDate": "not a date"}, "request": {"method": "POST", "url": "Patient"}}),
        json!({"request": {"method": "GET", "url": "Patient/does-not-exist"}}),
        json!({"request": {"method": "GET", "url": "Patient?identifier=urn:b|1"}}),
        json!({"request": {"method": "GET", "url": format!("Patient/{id}"), "ifNoneMatch": "W/\"1\""}}),
        json!({"request": {"method": "DELETE", "url": format!("Patient/{id}")}}),
        json!({"resource": {"resourceType": "Patient", "id": "other"}, "request": {"method": "PUT", "url": "Patient/mismatch"}}),
    ]);
    let (status, response) = post_bundle(&server, &bundle, None).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["type"], "batch-response");
    assert_eq!(
        statuses(&response),
        [
            "201 Created",
            "400 Bad Request",
            "404 Not Found",
            "200 OK",
            "304 Not Modified",
            "204 No Content",
            "400 Bad Request"
        ]
    );
    let outcome = &response["entry"][1]["response"]["outcome"];
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(
        outcome["issue"][0]["expression"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("Bundle.entry[1].resource.birthDate")),
        "{outcome}"
    );
    assert_eq!(response["entry"][3]["resource"]["type"], "searchset");
    assert_eq!(response["entry"][3]["resource"]["total"], 1);
    assert_eq!(server.get(&target(&response, 0)).await.0, 200, "the valid entry was written");
    assert_eq!(server.get(&format!("Patient/{id}")).await.0, 410);
    server.stop().await;
}

#[tokio::test]
async fn prefer_return_shapes_the_entries() {
    let server = TestServer::start().await;
    let one =
        || transaction(vec![post("urn:uuid:99999999-9999-4999-8999-999999999999", json!({"resourceType": "Patient"}))]);
    let (_, minimal) = post_bundle(&server, &one(), Some("return=minimal")).await;
    assert!(minimal["entry"][0].get("resource").is_none(), "{minimal}");
    assert!(minimal["entry"][0]["response"]["location"].is_string());
    assert_eq!(minimal["entry"][0]["response"]["etag"], "W/\"1\"");
    let (_, outcome) = post_bundle(&server, &one(), Some("return=OperationOutcome")).await;
    assert_eq!(outcome["entry"][0]["response"]["outcome"]["resourceType"], "OperationOutcome", "{outcome}");
    let (_, full) = post_bundle(&server, &one(), None).await;
    assert_eq!(full["entry"][0]["resource"]["resourceType"], "Patient");
    server.stop().await;
}

#[tokio::test]
async fn malformed_bundles_are_400_and_write_nothing() {
    let server = TestServer::start().await;
    let history = system_history(&server).await;
    let cases = [
        (json!({"resourceType": "Bundle", "type": "collection", "entry": []}), "Bundle.type"),
        (json!({"resourceType": "Patient"}), "Bundle.resourceType"),
        (transaction(vec![json!({"resource": {"resourceType": "Patient"}})]), "Bundle.entry[0].request"),
        (
            transaction(vec![
                post("urn:uuid:aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa", json!({"resourceType": "Patient"})),
                post("urn:uuid:aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa", json!({"resourceType": "Patient"})),
            ]),
            "Bundle.entry[1].fullUrl",
        ),
        (
            transaction(vec![post(
                "urn:uuid:bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb",
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                       "subject": {"reference": "urn:uuid:cccccccc-cccc-4ccc-8ccc-cccccccccccc"}}),
            )]),
            "Bundle.entry[0].resource.subject.reference",
        ),
        (
            transaction(vec![
                json!({"resource": {"resourceType": "Patient", "id": "twice"}, "request": {"method": "PUT", "url": "Patient/twice"}}),
                json!({"request": {"method": "DELETE", "url": "Patient/twice"}}),
            ]),
            // DELETEs are processed first: the PUT is the second to touch the resource.
            "Bundle.entry[0].request",
        ),
        (
            transaction(vec![json!({"request": {"method": "POST", "url": "ValueSet/$lookup"}})]),
            "Bundle.entry[0].request.url",
        ),
    ];
    for (bundle, expression) in cases {
        let (status, body) = post_bundle(&server, &bundle, None).await;
        assert_eq!(status, 400, "{bundle}: {body}");
        assert_eq!(expect_outcome(&body).1.as_deref(), Some(expression), "{body}");
    }
    let response = server
        .client
        .post(server.url(""))
        .header("content-type", "application/fhir+json")
        .body("{\"resourceType\": \"Bundle\", \"type\": ")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 400);
    assert_eq!(system_history(&server).await, history);
    server.stop().await;
}

#[tokio::test]
async fn entry_and_byte_limits_answer_413() {
    let server = TestServer::start_with(|config| {
        config.resource.max_bundle_entries = 3;
        config.server.max_bundle_bytes = 4096;
    })
    .await;
    let many = transaction((0..4).map(|_| json!({"request": {"method": "GET", "url": "Patient"}})).collect());
    assert_eq!(post_bundle(&server, &many, None).await.0, 413);
    let big = transaction(vec![post(
        "urn:uuid:dddddddd-dddd-4ddd-8ddd-dddddddddddd",
        json!({"resourceType": "Patient", "name": [{"text": "x".repeat(5000)}]}),
    )]);
    assert_eq!(post_bundle(&server, &big, None).await.0, 413);
    server.stop().await;
}

fn references_of(value: &Value) -> Vec<String> {
    match value {
        Value::Object(map) => map
            .iter()
            .flat_map(|(key, child)| match (key.as_str(), child) {
                ("reference", Value::String(reference)) => vec![reference.clone()],
                _ => references_of(child),
            })
            .collect(),
        Value::Array(items) => items.iter().flat_map(references_of).collect(),
        _ => Vec::new(),
    }
}

/// The transaction and batch Bundles among the R4 spec examples.
fn spec_example(id: &str) -> Value {
    fhirmesh_fhir::examples::spec_examples()
        .find(|example| example["resourceType"] == "Bundle" && example["id"] == id)
        .unwrap_or_else(|| panic!("spec example Bundle/{id}"))
}

#[tokio::test]
async fn spec_example_transactions_load_with_every_local_reference_resolved() {
    let server = TestServer::start().await;
    for id in ["hla-1", "xds", "ussg-fht"] {
        let bundle = spec_example(id);
        let entries = bundle["entry"].as_array().expect("entries").len();
        let (status, response) = post_bundle(&server, &bundle, Some("return=minimal")).await;
        assert_eq!(status, 200, "{id}: {response}");
        let statuses = statuses(&response);
        assert_eq!(statuses.len(), entries);
        assert!(statuses.iter().all(|s| s == "201 Created"), "{id}: {statuses:?}");
        let written: HashSet<String> = (0..entries).map(|i| target(&response, i)).collect();
        for path in &written {
            let (status, stored) = server.get(path).await;
            assert_eq!(status, 200, "{id}: {path}");
            let text = stored.to_string();
            assert!(!text.contains("\"reference\":\"urn:"), "{id}: {path} still has a urn reference: {text}");
            if id == "xds" {
                // Every reference of this example points into the Bundle (relative to the
                // absolute fullUrls): each now names a stored resource.
                for reference in references_of(&stored) {
                    assert!(
                        written.contains(&reference),
                        "{id}: {path} refers to {reference}, not written by the bundle"
                    );
                }
            }
        }
    }
    // The spec's kitchen-sink transaction carries an operation entry (ValueSet/$lookup), which a
    // transaction here cannot: 400 naming it, nothing written.
    let history = system_history(&server).await;
    let (status, body) = post_bundle(&server, &spec_example("bundle-transaction"), None).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(expect_outcome(&body).1.as_deref(), Some("Bundle.entry[7].request.url"));
    assert_eq!(system_history(&server).await, history);
    server.stop().await;
}

#[tokio::test]
async fn spec_example_batches_answer_every_entry() {
    let server = TestServer::start().await;
    let (status, _) = server
        .client
        .put(server.url("Patient/example"))
        .header("content-type", "application/fhir+json")
        .body(json!({"resourceType": "Patient", "id": "example", "active": true}).to_string())
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .expect("sent");
    assert_eq!(status, 201);
    for id in ["bundle-request-simplesummary", "bundle-request-medsallergies"] {
        let bundle = spec_example(id);
        let (status, response) = post_bundle(&server, &bundle, None).await;
        assert_eq!(status, 200, "{id}: {response}");
        let statuses = statuses(&response);
        assert!(statuses.iter().all(|s| s == "200 OK"), "{id}: {statuses:?}");
        assert_eq!(response["entry"][0]["resource"]["id"], "example");
        for entry in &response["entry"].as_array().expect("entries")[1..] {
            assert_eq!(entry["resource"]["type"], "searchset", "{id}");
        }
    }
    server.stop().await;
}
