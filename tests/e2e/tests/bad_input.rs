//! Malformed requests of every kind get the right 4xx and an OperationOutcome saying what is wrong
//! and where — never a 5xx — and never change stored data.

use fhirmesh_testkit::{TestServer, expect_outcome, status_and_json};
use serde_json::json;

async fn send(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> (u16, serde_json::Value) {
    let mut request = server.client.request(method, server.url(path)).body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    status_and_json(request.send().await.expect("sent")).await
}

const JSON: (&str, &str) = ("content-type", "application/fhir+json");

#[tokio::test]
async fn malformed_bodies_are_400_with_a_located_outcome() {
    let server = TestServer::start().await;
    let cases: Vec<(&str, String, Option<&str>, &str)> = vec![
        ("broken JSON", "{\"resourceType\": \"Patient\",".into(), None, "not valid JSON"),
        ("not an object", "[1,2,3]".into(), None, "JSON object"),
        (
            "wrong resourceType",
            json!({ "resourceType": "Observation" }).to_string(),
            Some("resourceType"),
            "does not match",
        ),
        ("missing resourceType", json!({ "name": [] }).to_string(), Some("resourceType"), "resourceType"),
        (
            "unknown element",
            json!({ "resourceType": "Patient", "nickname": "Ada" }).to_string(),
            Some("Patient.nickname"),
            "nickname",
        ),
        (
            "wrong type deep inside",
            json!({ "resourceType": "Patient", "name": [{ "given": ["Ada", 7] }] }).to_string(),
            Some("Patient.name[0].given[1]"),
            "",
        ),
        (
            "bad date",
            json!({ "resourceType": "Patient", "birthDate": "1815-13-45" }).to_string(),
            Some("Patient.birthDate"),
            "",
        ),
        ("bad code", json!({ "resourceType": "Patient", "gender": "cat" }).to_string(), Some("Patient.gender"), ""),
    ];
    for (case, body, expression, message) in cases {
        let (status, outcome) = send(&server, reqwest::Method::POST, "Patient", &[JSON], body).await;
        assert_eq!(status, 400, "{case}: {outcome}");
        let (diagnostics, found) = expect_outcome(&outcome);
        if let Some(expected) = expression {
            assert_eq!(found.as_deref(), Some(expected), "{case}: {outcome}");
        }
        assert!(diagnostics.contains(message), "{case}: {diagnostics}");
    }
    let (_, history) = server.get("_history").await;
    assert_eq!(history["entry"].as_array().map(Vec::len), Some(0), "nothing was written");
    server.stop().await;
}

#[tokio::test]
async fn update_id_rules() {
    let server = TestServer::start().await;
    let (status, outcome) = send(
        &server,
        reqwest::Method::PUT,
        "Patient/a1",
        &[JSON],
        json!({ "resourceType": "Patient", "id": "b2" }).to_string(),
    )
    .await;
    assert_eq!(status, 400, "id mismatch");
    let (diagnostics, expression) = expect_outcome(&outcome);
    assert!(diagnostics.contains("b2") && diagnostics.contains("a1"), "{diagnostics}");
    assert_eq!(expression.as_deref(), Some("Patient.id"));

    let (status, outcome) =
        send(&server, reqwest::Method::PUT, "Patient/a1", &[JSON], json!({ "resourceType": "Patient" }).to_string())
            .await;
    assert_eq!(status, 400, "missing id on update");
    expect_outcome(&outcome);

    let long = "x".repeat(65);
    for bad in ["Patient/has%20space", "Patient/under_score", &format!("Patient/{long}")] {
        let (status, outcome) = server.get(bad).await;
        assert_eq!(status, 400, "{bad}");
        let (_, expression) = expect_outcome(&outcome);
        assert_eq!(expression.as_deref(), Some("id"));
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_types_versions_and_routes() {
    let server = TestServer::start().await;
    for path in ["Patients/1", "patient/1", "Resource/1", "DomainResource", "Foo/_history"] {
        let (status, outcome) = server.get(path).await;
        assert_eq!(status, 404, "{path}");
        let (diagnostics, _) = expect_outcome(&outcome);
        assert!(diagnostics.contains("resource type"), "{path}: {diagnostics}");
    }
    let (status, _) = send(&server, reqwest::Method::POST, "Foo", &[JSON], "{}").await;
    assert_eq!(status, 404);

    let (_, created) = server.create(&json!({ "resourceType": "Patient" })).await;
    let id = created["id"].as_str().expect("id");
    for version in ["2", "0", "abc", "99999999999999999999999"] {
        let (status, outcome) = server.get(&format!("Patient/{id}/_history/{version}")).await;
        assert_eq!(status, 404, "version {version}");
        expect_outcome(&outcome);
    }
    let (status, outcome) = server.get("Patient/1/2/3/4/5").await;
    assert_eq!(status, 404);
    expect_outcome(&outcome);
    let (status, outcome) = send(&server, reqwest::Method::DELETE, "metadata", &[], "").await;
    assert_eq!(status, 405);
    expect_outcome(&outcome);
    server.stop().await;
}

#[tokio::test]
async fn oversize_bodies_are_413() {
    let server = TestServer::start_with(|c| c.server.max_body_bytes = 64 * 1024).await;
    let big = json!({ "resourceType": "Patient", "name": [{ "text": "x".repeat(100 * 1024) }] }).to_string();
    let (status, outcome) = send(&server, reqwest::Method::POST, "Patient", &[JSON], big.clone()).await;
    assert_eq!(status, 413);
    let (diagnostics, _) = expect_outcome(&outcome);
    assert!(diagnostics.contains("65536"), "{diagnostics}");

    // The same without a Content-Length (chunked): the limit holds while streaming.
    let stream = futures::stream::iter(
        big.into_bytes().chunks(4096).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>(),
    );
    let response = server
        .client
        .post(server.url("Patient"))
        .header("content-type", "application/fhir+json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 413);
    expect_outcome(&status_and_json(response).await.1);
    server.stop().await;
}

#[tokio::test]
async fn headers_and_media_types() {
    let server = TestServer::start().await;
    let body = json!({ "resourceType": "Patient" }).to_string();
    let (status, outcome) =
        send(&server, reqwest::Method::POST, "Patient", &[("content-type", "application/fhir+xml")], body.clone())
            .await;
    assert_eq!(status, 415);
    expect_outcome(&outcome);
    let (status, outcome) =
        send(&server, reqwest::Method::POST, "Patient", &[JSON, ("accept", "application/fhir+xml")], body.clone())
            .await;
    assert_eq!(status, 406);
    expect_outcome(&outcome);

    let (_, created) = server.create(&json!({ "resourceType": "Patient" })).await;
    let path = format!("Patient/{}", created["id"].as_str().expect("id"));
    for bad in ["1", "W/1", "W/\"one\"", "*"] {
        let (status, outcome) =
            send(&server, reqwest::Method::PUT, &path, &[JSON, ("if-match", bad)], created.to_string()).await;
        assert_eq!(status, 400, "If-Match {bad}");
        expect_outcome(&outcome);
    }
    let (status, outcome) = send(&server, reqwest::Method::PATCH, &path, &[("content-type", "text/plain")], "[]").await;
    assert_eq!(status, 415);
    expect_outcome(&outcome);
    let (status, outcome) =
        send(&server, reqwest::Method::PATCH, &path, &[("content-type", "application/json-patch+json")], "{\"op\":1}")
            .await;
    assert!(matches!(status, 400 | 422), "bad JSON Patch document: {status}");
    expect_outcome(&outcome);
    let (status, outcome) =
        send(&server, reqwest::Method::PATCH, &path, &[JSON], json!({ "resourceType": "Patient" }).to_string()).await;
    assert_eq!(status, 400, "FHIRPath Patch needs Parameters");
    expect_outcome(&outcome);
    let (status, outcome) = send(&server, reqwest::Method::POST, "Patient", &[JSON, ("if-none-exist", "")], body).await;
    assert_eq!(status, 400, "empty If-None-Exist");
    expect_outcome(&outcome);
    let (status, outcome) = server.get("Patient?_count=many&_id=x").await;
    assert_eq!(status, 400);
    expect_outcome(&outcome);
    server.stop().await;
}

/// A fixed, bounded corpus of hostile inputs: whatever the answer, it is never a 5xx and always an
/// OperationOutcome.
#[tokio::test]
async fn hostile_inputs_never_get_a_5xx() {
    let server = TestServer::start().await;
    let bodies = [
        "".to_owned(),
        "null".into(),
        "\"Patient\"".into(),
        "{".repeat(10_000),
        "[".repeat(100_000),
        format!("{{\"resourceType\":\"Patient\",\"name\":[{}]}}", "{\"given\":[\"a\"]},".repeat(1000) + "{}"),
        "{\"resourceType\":\"Patient\",\"id\":\"\u{0000}\"}".into(),
        "{\"resourceType\":\"Patient\",\"meta\":\"x\"}".into(),
        "{\"resourceType\":\"Patient\",\"meta\":{\"versionId\":7}}".into(),
        "{\"resourceType\":\"Patient\",\"contained\":[{\"resourceType\":\"Nope\"}]}".into(),
        "{\"resourceType\":\"Patient\",\"birthDate\":1e400}".into(),
        String::from_utf8_lossy(&[0xff, 0xfe, 0x00]).into_owned(),
    ];
    for body in &bodies {
        for (method, path) in [
            (reqwest::Method::POST, "Patient"),
            (reqwest::Method::PUT, "Patient/x"),
            (reqwest::Method::POST, "Patient/_search"),
        ] {
            let response = server
                .client
                .request(method.clone(), server.url(path))
                .header("content-type", "application/fhir+json")
                .body(body.clone())
                .send()
                .await
                .expect("sent");
            let status = response.status().as_u16();
            assert!(status < 500, "{method} {path} with {:.60}… answered {status}", body);
            if status >= 400 {
                expect_outcome(&status_and_json(response).await.1);
            }
        }
    }
    for path in [
        "Patient/%ZZ",
        "Patient?_id=%ff%fe",
        "_history?_since=%00",
        "Patient/x/_history/-1",
        "%2e%2e/%2e%2e/etc/passwd",
    ] {
        let (status, body) = server.get(path).await;
        assert!((400..500).contains(&status), "{path} answered {status}");
        expect_outcome(&body);
    }
    server.stop().await;
}
