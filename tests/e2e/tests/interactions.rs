//! Every REST interaction over real HTTP against the embedded server: status codes, headers and
//! bodies.

use fhirmesh_testkit::{TestServer, expect_outcome, status_and_json};
use serde_json::{Value, json};

fn patient(family: &str) -> Value {
    json!({ "resourceType": "Patient", "active": true, "name": [{ "family": family, "given": ["Ada"] }] })
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

#[tokio::test]
async fn create_returns_201_with_location_etag_and_stamped_meta() {
    let server = TestServer::start().await;
    let response = server
        .client
        .post(server.url("Patient"))
        .header("content-type", "application/fhir+json")
        .body(
            json!({ "resourceType": "Patient", "id": "client-chosen", "name": [{ "family": "Lovelace" }] }).to_string(),
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 201);
    let location = header(&response, "location").expect("Location header");
    assert_eq!(header(&response, "etag").as_deref(), Some("W/\"1\""));
    assert!(header(&response, "last-modified").is_some_and(|v| v.ends_with("GMT")));
    assert_eq!(header(&response, "content-type").as_deref(), Some("application/fhir+json; charset=utf-8"));
    let (_, body) = status_and_json(response).await;
    let id = body["id"].as_str().expect("server-assigned id");
    assert_ne!(id, "client-chosen", "create ignores a client id");
    assert_eq!(location, server.url(&format!("Patient/{id}/_history/1")));
    assert_eq!(body["meta"]["versionId"], "1");
    assert!(body["meta"]["lastUpdated"].as_str().is_some_and(|s| s.ends_with('Z')));
    assert_eq!(body["name"][0]["family"], "Lovelace");
    server.stop().await;
}

#[tokio::test]
async fn read_vread_update_delete_lifecycle() {
    let server = TestServer::start().await;
    let (_, created) = server.create(&patient("One")).await;
    let id = created["id"].as_str().expect("id").to_owned();

    let (status, read) = server.get(&format!("Patient/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(read, created);

    let mut changed = created.clone();
    changed["name"][0]["family"] = json!("Two");
    let response = server
        .client
        .put(server.url(&format!("Patient/{id}")))
        .header("content-type", "application/fhir+json")
        .body(changed.to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "etag").as_deref(), Some("W/\"2\""));
    let (_, updated) = status_and_json(response).await;
    assert_eq!(updated["meta"]["versionId"], "2");
    assert_eq!(updated["name"][0]["family"], "Two");

    let (status, v1) = server.get(&format!("Patient/{id}/_history/1")).await;
    assert_eq!(status, 200);
    assert_eq!(v1["name"][0]["family"], "One");
    let (status, v2) = server.get(&format!("Patient/{id}/_history/2")).await;
    assert_eq!(status, 200);
    assert_eq!(v2, updated);
    let (status, body) = server.get(&format!("Patient/{id}/_history/9")).await;
    assert_eq!(status, 404, "unknown version");
    expect_outcome(&body);

    let response = server.client.delete(server.url(&format!("Patient/{id}"))).send().await.expect("sent");
    assert_eq!(response.status(), 204);
    assert_eq!(header(&response, "etag").as_deref(), Some("W/\"3\""));
    let (status, body) = server.get(&format!("Patient/{id}")).await;
    assert_eq!(status, 410, "read after delete is Gone");
    expect_outcome(&body);
    let (status, _) = server.get(&format!("Patient/{id}/_history/3")).await;
    assert_eq!(status, 410, "vread of the tombstone is Gone");
    let (status, _) = server.get(&format!("Patient/{id}/_history/2")).await;
    assert_eq!(status, 200, "older versions stay readable");

    let response = server.client.delete(server.url(&format!("Patient/{id}"))).send().await.expect("sent");
    assert_eq!(response.status(), 204, "repeated delete is fine");
    assert!(header(&response, "etag").is_none(), "a repeated delete writes no version");

    let response = server.client.delete(server.url("Patient/never-existed")).send().await.expect("sent");
    assert_eq!(response.status(), 204);

    // Update after delete brings the resource back as a new version.
    let mut revived = changed.clone();
    revived["name"][0]["family"] = json!("Three");
    let response = server
        .client
        .put(server.url(&format!("Patient/{id}")))
        .header("content-type", "application/fhir+json")
        .body(revived.to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 201);
    let (_, body) = status_and_json(response).await;
    assert_eq!(body["meta"]["versionId"], "4");
    server.stop().await;
}

#[tokio::test]
async fn update_as_create_is_on_by_default_and_can_be_turned_off() {
    let server = TestServer::start().await;
    let resource = json!({ "resourceType": "Patient", "id": "chosen-1", "gender": "female" });
    let response = server
        .client
        .put(server.url("Patient/chosen-1"))
        .header("content-type", "application/fhir+json")
        .body(resource.to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "location"), Some(server.url("Patient/chosen-1/_history/1")));
    server.stop().await;

    let server = TestServer::start_with(|c| c.resource.update_create = false).await;
    let response = server
        .client
        .put(server.url("Patient/chosen-1"))
        .header("content-type", "application/fhir+json")
        .body(resource.to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 405);
    expect_outcome(&status_and_json(response).await.1);
    let (_, metadata) = server.get("metadata").await;
    assert_eq!(metadata["rest"][0]["resource"][0]["updateCreate"], false);
    server.stop().await;
}

#[tokio::test]
async fn if_match_guards_update_and_delete() {
    let server = TestServer::start().await;
    let (_, created) = server.create(&patient("Match")).await;
    let id = created["id"].as_str().expect("id").to_owned();
    let put = |etag: &'static str| {
        server
            .client
            .put(server.url(&format!("Patient/{id}")))
            .header("content-type", "application/fhir+json")
            .header("if-match", etag)
            .body(created.to_string())
    };
    let response = put("W/\"2\"").send().await.expect("sent");
    assert_eq!(response.status(), 412, "stale version");
    let (diagnostics, _) = expect_outcome(&status_and_json(response).await.1);
    assert!(diagnostics.contains("version 1"), "{diagnostics}");

    let response = put("W/\"1\"").send().await.expect("sent");
    assert_eq!(response.status(), 200);

    let response = put("version-one").send().await.expect("sent");
    assert_eq!(response.status(), 400, "malformed If-Match");
    expect_outcome(&status_and_json(response).await.1);

    let response = server
        .client
        .delete(server.url(&format!("Patient/{id}")))
        .header("if-match", "W/\"1\"")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 412);
    let response = server
        .client
        .delete(server.url(&format!("Patient/{id}")))
        .header("if-match", "W/\"2\"")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 204);
    server.stop().await;
}

#[tokio::test]
async fn prefer_return_shapes_write_responses() {
    let server = TestServer::start().await;
    let send = |prefer: &'static str| {
        server
            .client
            .post(server.url("Patient"))
            .header("content-type", "application/fhir+json")
            .header("prefer", prefer)
            .body(patient("Prefer").to_string())
            .send()
    };
    let response = send("return=minimal").await.expect("sent");
    assert_eq!(response.status(), 201);
    assert!(header(&response, "location").is_some());
    assert!(response.bytes().await.expect("body").is_empty());

    let (status, body) = status_and_json(send("return=OperationOutcome").await.expect("sent")).await;
    assert_eq!(status, 201);
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(body["issue"][0]["severity"], "information");

    let (status, body) = status_and_json(send("return=representation").await.expect("sent")).await;
    assert_eq!(status, 201);
    assert_eq!(body["resourceType"], "Patient");
    server.stop().await;
}

#[tokio::test]
async fn json_patch_and_fhirpath_patch() {
    let server = TestServer::start().await;
    let (_, created) = server.create(&patient("Patchy")).await;
    let id = created["id"].as_str().expect("id").to_owned();

    let response = server
        .client
        .patch(server.url(&format!("Patient/{id}")))
        .header("content-type", "application/json-patch+json")
        .header("if-match", "W/\"1\"")
        .body(json!([{ "op": "replace", "path": "/active", "value": false }, { "op": "add", "path": "/gender", "value": "other" }]).to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "etag").as_deref(), Some("W/\"2\""));
    let (_, body) = status_and_json(response).await;
    assert_eq!(body["active"], false);
    assert_eq!(body["gender"], "other");

    let parameters = json!({
        "resourceType": "Parameters",
        "parameter": [{
            "name": "operation",
            "part": [
                { "name": "type", "valueCode": "replace" },
                { "name": "path", "valueString": "Patient.name[0].family" },
                { "name": "value", "valueString": "Patched" }
            ]
        }]
    });
    let response = server
        .client
        .patch(server.url(&format!("Patient/{id}")))
        .header("content-type", "application/fhir+json")
        .body(parameters.to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    let (_, body) = status_and_json(response).await;
    assert_eq!(body["name"][0]["family"], "Patched");
    assert_eq!(body["meta"]["versionId"], "3");

    // A patch that produces an invalid resource is refused and writes nothing.
    let response = server
        .client
        .patch(server.url(&format!("Patient/{id}")))
        .header("content-type", "application/json-patch+json")
        .body(json!([{ "op": "add", "path": "/birthDate", "value": "not-a-date" }]).to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 400);
    let (_, expression) = expect_outcome(&status_and_json(response).await.1);
    assert_eq!(expression.as_deref(), Some("Patient.birthDate"));

    // A failing JSON Patch test op is a 422.
    let response = server
        .client
        .patch(server.url(&format!("Patient/{id}")))
        .header("content-type", "application/json-patch+json")
        .body(json!([{ "op": "test", "path": "/gender", "value": "male" }]).to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 422);
    expect_outcome(&status_and_json(response).await.1);

    let (_, current) = server.get(&format!("Patient/{id}")).await;
    assert_eq!(current["meta"]["versionId"], "3", "failed patches wrote nothing");

    let response = server
        .client
        .patch(server.url("Patient/missing"))
        .header("content-type", "application/json-patch+json")
        .body("[]")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 404);
    server.stop().await;
}

#[tokio::test]
async fn conditional_create_with_if_none_exist() {
    let server = TestServer::start().await;
    let resource = json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:oid:1.2.3", "value": "MRN-7" }]
    });
    let send = |query: &'static str| {
        server
            .client
            .post(server.url("Patient"))
            .header("content-type", "application/fhir+json")
            .header("if-none-exist", query)
            .body(resource.to_string())
            .send()
    };
    let (status, first) = status_and_json(send("identifier=urn:oid:1.2.3|MRN-7").await.expect("sent")).await;
    assert_eq!(status, 201);
    let (status, again) = status_and_json(send("identifier=urn:oid:1.2.3|MRN-7").await.expect("sent")).await;
    assert_eq!(status, 200, "a match returns the existing resource");
    assert_eq!(again["id"], first["id"]);
    let (status, _) = status_and_json(send("identifier=MRN-7").await.expect("sent")).await;
    assert_eq!(status, 200, "value without system matches too");
    let (status, _) = status_and_json(send("identifier=urn:oid:9.9|MRN-7").await.expect("sent")).await;
    assert_eq!(status, 201, "another system is another identifier");
    let (status, _) = status_and_json(send("identifier=MRN-7").await.expect("sent")).await;
    assert_eq!(status, 412, "two matches");
    let (status, body) = status_and_json(send("no-such-param=Smith").await.expect("sent")).await;
    assert_eq!(status, 400, "unknown criteria are refused, not ignored: a widened condition could match anything");
    expect_outcome(&body);
    server.stop().await;
}

#[tokio::test]
async fn history_at_every_level_with_paging_since_and_at() {
    let server = TestServer::start().await;
    let (_, a) = server.create(&patient("A")).await;
    let id = a["id"].as_str().expect("id").to_owned();
    let mut changed = a.clone();
    for family in ["A2", "A3"] {
        changed["name"][0]["family"] = json!(family);
        let response = server
            .client
            .put(server.url(&format!("Patient/{id}")))
            .header("content-type", "application/fhir+json")
            .body(changed.to_string())
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), 200);
    }
    server.client.delete(server.url(&format!("Patient/{id}"))).send().await.expect("sent");
    let (_, obs) =
        server.create(&json!({ "resourceType": "Observation", "status": "final", "code": { "text": "weight" } })).await;

    let (status, bundle) = server.get(&format!("Patient/{id}/_history")).await;
    assert_eq!(status, 200);
    assert_eq!(bundle["type"], "history");
    let versions: Vec<&str> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["response"]["etag"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(versions, ["W/\"4\"", "W/\"3\"", "W/\"2\"", "W/\"1\""], "newest first");
    assert_eq!(bundle["entry"][0]["request"]["method"], "DELETE");
    assert!(bundle["entry"][0].get("resource").is_none(), "a tombstone has no resource");
    assert_eq!(bundle["entry"][3]["request"]["method"], "POST");

    let (_, bundle) = server.get("Patient/_history").await;
    assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(4));
    let (_, bundle) = server.get("_history").await;
    assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(5));
    assert_eq!(bundle["entry"][0]["resource"]["id"], obs["id"]);

    // Paging: two at a time, following next links to the end.
    let mut url = server.url("_history?_count=2");
    let mut seen = Vec::new();
    for _ in 0..10 {
        let (status, page) = status_and_json(server.client.get(&url).send().await.expect("sent")).await;
        assert_eq!(status, 200);
        let entries = page["entry"].as_array().expect("entries");
        assert!(entries.len() <= 2);
        seen.extend(entries.iter().map(|e| e["response"]["etag"].clone()));
        match page["link"].as_array().and_then(|l| l.iter().find(|l| l["relation"] == "next")) {
            Some(next) => url = next["url"].as_str().expect("next url").to_owned(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "paging visits every version once: {seen:?}");

    let (_, bundle) = server.get("_history?_since=2999-01-01").await;
    assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(0));
    let (_, bundle) = server.get("_history?_since=2000-01-01T00:00:00Z").await;
    assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(5));
    let (_, bundle) = server.get("Patient/_history?_at=1999").await;
    assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(0), "nothing was current in 1999");
    let now = a["meta"]["lastUpdated"].as_str().expect("lastUpdated");
    let year = &now[..4];
    let (_, bundle) = server.get(&format!("Patient/{id}/_history?_at={year}")).await;
    assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(4), "every version was current this year");

    for bad in [
        "_history?_count=-1",
        "_history?_since=yesterday",
        "_history?_at=13-13",
        "_history?_page_token=x",
        "_history?name=x",
    ] {
        let (status, body) = server.get(bad).await;
        assert_eq!(status, 400, "{bad}");
        expect_outcome(&body);
    }
    server.stop().await;
}

#[tokio::test]
async fn summary_elements_pretty_and_format() {
    let server = TestServer::start().await;
    let (_, created) = server
        .create(&json!({
            "resourceType": "Patient",
            "text": { "status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Ada</div>" },
            "name": [{ "family": "Lovelace" }],
            "gender": "female",
            "maritalStatus": { "text": "married" }
        }))
        .await;
    let id = created["id"].as_str().expect("id").to_owned();

    let (_, summary) = server.get(&format!("Patient/{id}?_summary=true")).await;
    assert_eq!(summary["name"][0]["family"], "Lovelace");
    assert!(summary.get("maritalStatus").is_none(), "maritalStatus is not a summary element");
    assert!(summary.get("text").is_none());
    let tags = summary["meta"]["tag"].as_array().expect("SUBSETTED tag");
    assert!(tags.iter().any(|t| t["code"] == "SUBSETTED"));

    let (_, text) = server.get(&format!("Patient/{id}?_summary=text")).await;
    assert!(text.get("text").is_some());
    assert!(text.get("name").is_none());

    let (_, data) = server.get(&format!("Patient/{id}?_summary=data")).await;
    assert!(data.get("text").is_none());
    assert!(data.get("maritalStatus").is_some());

    let (_, elements) = server.get(&format!("Patient/{id}?_elements=gender")).await;
    assert_eq!(elements["gender"], "female");
    assert!(elements.get("name").is_none());
    assert_eq!(elements["id"], id.as_str());

    let response = server.client.get(server.url(&format!("Patient/{id}?_pretty=true"))).send().await.expect("sent");
    let text = response.text().await.expect("body");
    assert!(text.contains("\n  \"resourceType\""), "pretty printed: {text}");

    let (status, _) = server.get(&format!("Patient/{id}?_format=json")).await;
    assert_eq!(status, 200);
    let (status, _) = server.get(&format!("Patient/{id}?_format=application/fhir%2Bjson")).await;
    assert_eq!(status, 200);
    let (status, body) = server.get(&format!("Patient/{id}?_format=xml")).await;
    assert_eq!(status, 406);
    let (diagnostics, _) = expect_outcome(&body);
    assert!(diagnostics.contains("XML"), "{diagnostics}");
    let response = server
        .client
        .get(server.url(&format!("Patient/{id}")))
        .header("accept", "application/fhir+xml")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 406);
    let (status, _) = server.get(&format!("Patient/{id}?_summary=maybe")).await;
    assert_eq!(status, 400);
    server.stop().await;
}

#[tokio::test]
async fn search_by_id_and_identifier() {
    let server = TestServer::start().await;
    let (_, p) = server
        .create(&json!({ "resourceType": "Patient", "identifier": [{ "system": "urn:s", "value": "42" }] }))
        .await;
    let id = p["id"].as_str().expect("id");
    let (status, bundle) = server.get(&format!("Patient?_id={id}")).await;
    assert_eq!(status, 200);
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(bundle["total"], 1);
    assert_eq!(bundle["entry"][0]["resource"]["id"], id);
    assert_eq!(bundle["entry"][0]["search"]["mode"], "match");
    let (_, bundle) = server.get("Patient?identifier=urn:s%7C42").await;
    assert_eq!(bundle["total"], 1);
    let (_, bundle) = server.get("Patient?identifier=urn:other%7C42").await;
    assert_eq!(bundle["total"], 0);
    let response = server
        .client
        .get(server.url("Patient?no-such-param=x"))
        .header("prefer", "handling=strict")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 400, "unknown parameters are errors under Prefer: handling=strict");
    let (diagnostics, _) = expect_outcome(&status_and_json(response).await.1);
    assert!(diagnostics.contains("no-such-param"), "{diagnostics}");
    let (status, bundle) = server.get("Patient?no-such-param=x&_id=nothing").await;
    assert_eq!(status, 200, "lenient by default");
    let self_link = bundle["link"][0]["url"].as_str().expect("self link");
    assert!(!self_link.contains("no-such-param"), "the self link shows only what was applied: {self_link}");
    server.stop().await;
}

#[tokio::test]
async fn capability_statement_lists_all_resource_types() {
    let server = TestServer::start().await;
    let (status, cs) = server.get("metadata").await;
    assert_eq!(status, 200);
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let resources = cs["rest"][0]["resource"].as_array().expect("resources");
    // R4 4.0.1 defines 146 concrete resource types (StructureDefinitions of kind resource,
    // derivation specialization, not abstract); every one is served.
    assert_eq!(resources.len(), 146);
    let patient = resources.iter().find(|r| r["type"] == "Patient").expect("Patient");
    let interactions: Vec<&str> =
        patient["interaction"].as_array().expect("interactions").iter().filter_map(|i| i["code"].as_str()).collect();
    for code in
        ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]
    {
        assert!(interactions.contains(&code), "{code}");
    }
    let params: Vec<&str> =
        patient["searchParam"].as_array().expect("searchParam").iter().filter_map(|p| p["name"].as_str()).collect();
    for code in ["_id", "_lastUpdated", "name", "family", "identifier", "birthdate", "general-practitioner"] {
        assert!(params.contains(&code), "Patient search parameter {code}");
    }
    assert!(!params.contains(&"_text"), "unsupported parameters are not advertised");
    let documentation = patient["documentation"].as_str().expect("unsupported parameters are stated");
    assert!(documentation.contains("_text") && documentation.contains("_content"), "{documentation}");
    server.stop().await;
}

#[tokio::test]
async fn base_path_prefixes_every_route_and_link() {
    let server = TestServer::start_with(|c| c.server.base_path = "/fhir".into()).await;
    assert!(server.base.ends_with("/fhir"));
    let response = server
        .client
        .post(server.url("Patient"))
        .header("content-type", "application/fhir+json")
        .body(patient("Base").to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 201);
    assert!(header(&response, "location").is_some_and(|l| l.starts_with(&server.base)));
    let (status, _) = server.get("metadata").await;
    assert_eq!(status, 200);
    let (status, body) = server.get("../Patient").await;
    assert_eq!(status, 404, "nothing outside the base path");
    expect_outcome(&body);
    server.stop().await;
}

#[tokio::test]
async fn conditional_update_creates_updates_or_refuses() {
    let server = TestServer::start().await;
    let put = |query: &'static str, body: Value| {
        server
            .client
            .put(server.url(&format!("Patient?{query}")))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
    };
    let resource =
        json!({ "resourceType": "Patient", "identifier": [{ "system": "urn:cu", "value": "1" }], "gender": "male" });

    // No match and no id: created with a server id.
    let response = put("identifier=urn:cu|1", resource.clone()).await.expect("sent");
    assert_eq!(response.status(), 201);
    let (_, created) = status_and_json(response).await;
    let id = created["id"].as_str().expect("id").to_owned();

    // One match: updated in place (the body needs no id).
    let mut changed = resource.clone();
    changed["gender"] = json!("female");
    let response = put("identifier=urn:cu|1", changed.clone()).await.expect("sent");
    assert_eq!(response.status(), 200);
    let (_, updated) = status_and_json(response).await;
    assert_eq!((updated["id"].as_str(), updated["meta"]["versionId"].as_str()), (Some(id.as_str()), Some("2")));
    assert_eq!(updated["gender"], "female");

    // One match but the body names another id: 400.
    let mut other = changed.clone();
    other["id"] = json!("someone-else");
    let response = put("identifier=urn:cu|1", other).await.expect("sent");
    assert_eq!(response.status(), 400);
    expect_outcome(&status_and_json(response).await.1);

    // No match with an id in the body: update-as-create with that id.
    let response = put(
        "identifier=urn:cu|2",
        json!({ "resourceType": "Patient", "id": "cu-2", "identifier": [{ "system": "urn:cu", "value": "2" }] }),
    )
    .await
    .expect("sent");
    assert_eq!(response.status(), 201);
    assert_eq!(status_and_json(response).await.1["id"], "cu-2");

    // Several matches: 412. Unknown criteria: 400, never a widened match.
    let response = put("identifier=urn:cu|", resource.clone()).await.expect("sent");
    assert_eq!(response.status(), 412);
    expect_outcome(&status_and_json(response).await.1);
    let response = put("no-such-param=1", resource).await.expect("sent");
    assert_eq!(response.status(), 400);
    expect_outcome(&status_and_json(response).await.1);
    server.stop().await;
}

#[tokio::test]
async fn conditional_delete_single_and_multiple() {
    let server = TestServer::start().await;
    for value in ["a", "b", "c"] {
        let (status, _) = server
            .create(&json!({ "resourceType": "Patient", "identifier": [{ "system": "urn:cd", "value": value }] }))
            .await;
        assert_eq!(status, 201);
    }
    let delete = |query: &'static str| server.client.delete(server.url(&format!("Patient?{query}"))).send();
    let response = delete("identifier=urn:cd|").await.expect("sent");
    assert_eq!(response.status(), 412, "several matches, one-at-a-time server");
    expect_outcome(&status_and_json(response).await.1);
    let response = delete("identifier=urn:cd|a").await.expect("sent");
    assert_eq!(response.status(), 204);
    let (_, bundle) = server.get("Patient?identifier=urn:cd|").await;
    assert_eq!(bundle["total"], 2, "exactly one was deleted");
    let response = delete("identifier=urn:cd|nothing").await.expect("sent");
    assert_eq!(response.status(), 204, "no match is not an error");
    server.stop().await;

    let server = TestServer::start_with(|c| c.resource.conditional_delete_multiple = true).await;
    for value in ["a", "b"] {
        server
            .create(&json!({ "resourceType": "Patient", "identifier": [{ "system": "urn:cd", "value": value }] }))
            .await;
    }
    let response = server
        .client
        .delete(server.url("Patient?identifier=urn:cd|"))
        .header("prefer", "return=OperationOutcome")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    let (_, outcome) = status_and_json(response).await;
    assert!(
        outcome["issue"][0]["diagnostics"].as_str().is_some_and(|d| d.matches("Patient/").count() == 2),
        "{outcome}"
    );
    let (_, bundle) = server.get("Patient?identifier=urn:cd|").await;
    assert_eq!(bundle["total"], 0);
    let (_, metadata) = server.get("metadata").await;
    assert_eq!(metadata["rest"][0]["resource"][0]["conditionalDelete"], "multiple");
    server.stop().await;
}

#[tokio::test]
async fn metrics_expose_the_search_index_lag() {
    let server = TestServer::start().await;
    server.create(&patient("Metric")).await;
    // A search waits for the index, so afterwards the index has applied the write.
    let (status, _) = server.get("Patient?family=metric").await;
    assert_eq!(status, 200);
    let root = server.base.clone();
    let response = server.client.get(format!("{root}/metrics")).send().await.expect("sent");
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").is_some_and(|c| c.starts_with("application/openmetrics-text")));
    let text = response.text().await.expect("body");
    assert_eq!(text.lines().last(), Some("# EOF"), "an OpenMetrics exposition ends with # EOF");
    // The notifier of `fhirmesh serve` reports through the same endpoint.
    assert!(text.lines().any(|l| l == "fhirmesh_notifier_ready 1"), "notifier metrics missing from:\n{text}");
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
    };
    assert_eq!(value("fhirmesh_search_index_lag_changes"), 0);
    assert!(value("fhirmesh_store_latest_sequence") >= 1);
    assert_eq!(value("fhirmesh_search_index_watermark"), value("fhirmesh_store_latest_sequence"));
    server.stop().await;
}

#[tokio::test]
async fn every_write_returns_a_consistency_token_a_search_can_wait_for() {
    let server = TestServer::start().await;
    let token = |response: &reqwest::Response| -> u64 {
        header(response, "x-consistency-token").and_then(|t| t.parse().ok()).expect("a numeric X-Consistency-Token")
    };
    let family = "Tokened";
    let send = |request: reqwest::RequestBuilder, body: Option<Value>| async move {
        let request = match body {
            Some(body) => request.header("content-type", "application/fhir+json").body(body.to_string()),
            None => request,
        };
        request.send().await.expect("sent")
    };
    let created = send(server.client.post(server.url("Patient")), Some(patient(family))).await;
    assert_eq!(created.status(), 201);
    let after_create = token(&created);
    let id = header(&created, "location").expect("location").split('/').nth_back(2).expect("id").to_owned();
    let updated = send(
        server.client.put(server.url(&format!("Patient/{id}"))),
        Some({
            let mut changed = patient(family);
            changed["id"] = json!(id);
            changed
        }),
    )
    .await;
    assert_eq!(updated.status(), 200);
    let after_update = token(&updated);
    assert!(after_update > after_create, "{after_update} > {after_create}");
    let other = send(server.client.post(server.url("Patient")), Some(patient(family))).await;
    let other_id = header(&other, "location").expect("location").split('/').nth_back(2).expect("id").to_owned();

    // A delete and a conditional delete answer with their tombstone's token too; a search sent
    // with it sees the resources gone.
    let deleted = send(server.client.delete(server.url(&format!("Patient/{id}"))), None).await;
    assert_eq!(deleted.status(), 204);
    let after_delete = token(&deleted);
    assert!(after_delete > token(&other), "{after_delete}");
    let search = |at: u64| {
        server.client.get(server.url(&format!("Patient?family={family}"))).header("x-consistency-token", at).send()
    };
    let (status, bundle) = status_and_json(search(after_delete).await.expect("search")).await;
    assert_eq!(status, 200);
    let found: Vec<&str> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["resource"]["id"].as_str().expect("id"))
        .collect();
    assert_eq!(found, vec![other_id.as_str()], "{bundle}");
    let conditional = send(server.client.delete(server.url(&format!("Patient?_id={other_id}"))), None).await;
    assert_eq!(conditional.status(), 204);
    let after_conditional = token(&conditional);
    assert!(after_conditional > after_delete);
    let (_, bundle) = status_and_json(search(after_conditional).await.expect("search")).await;
    assert_eq!(bundle["total"], 0, "{bundle}");
    // Deleting what is gone writes nothing: no token.
    let again = send(server.client.delete(server.url(&format!("Patient/{id}"))), None).await;
    assert_eq!(again.status(), 204);
    assert_eq!(header(&again, "x-consistency-token"), None);
    server.stop().await;
}

/// POSTs `body` to `path` (a `$validate` URL) and returns (status, body).
async fn post_validate(server: &TestServer, path: &str, body: &Value) -> (u16, Value) {
    let response = server
        .client
        .post(server.url(path))
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .expect("sent");
    status_and_json(response).await
}

/// (severity, expression) of each issue of an OperationOutcome.
fn issues_of(outcome: &Value) -> Vec<(String, String)> {
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    outcome["issue"]
        .as_array()
        .expect("issues")
        .iter()
        .map(|i| {
            (
                i["severity"].as_str().unwrap_or_default().to_owned(),
                i["expression"][0].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn validate_reports_issues_without_writing() {
    let server = TestServer::start().await;
    // A valid resource: one information issue.
    let (status, outcome) = post_validate(&server, "Patient/$validate", &patient("Valid")).await;
    assert_eq!((status, issues_of(&outcome)), (200, vec![("information".to_owned(), String::new())]));

    // An invalid one: 200 still (validation ran), the errors with their FHIRPath.
    let invalid = json!({"resourceType": "Patient", "birthDate": "yesterday", "gender": "unknown-code"});
    let (status, outcome) = post_validate(&server, "Patient/$validate", &invalid).await;
    assert_eq!(status, 200, "{outcome}");
    let mut found = issues_of(&outcome);
    found.sort();
    assert_eq!(
        found,
        vec![("error".to_owned(), "Patient.birthDate".to_owned()), ("error".to_owned(), "Patient.gender".to_owned())]
    );
    // Nothing was written.
    let (_, bundle) = server.get("Patient").await;
    assert!(bundle["entry"].as_array().is_none_or(Vec::is_empty), "{bundle}");

    // The same as a Parameters resource with a mode; a type mismatch is an issue, not a failure.
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}},
        {"name": "mode", "valueCode": "create"}]});
    let (status, outcome) = post_validate(&server, "Patient/$validate", &parameters).await;
    assert_eq!((status, issues_of(&outcome)), (200, vec![("error".to_owned(), "resourceType".to_owned())]));

    // Update mode checks the instance: it must exist, and the id must match.
    let (_, created) = server.create(&patient("Existing")).await;
    let id = created["id"].as_str().expect("id").to_owned();
    let mut other_id = patient("Existing");
    other_id["id"] = json!("someone-else");
    let (status, outcome) = post_validate(&server, &format!("Patient/{id}/$validate?mode=update"), &other_id).await;
    assert_eq!((status, issues_of(&outcome)), (200, vec![("error".to_owned(), "Patient.id".to_owned())]));
    let mut same_id = patient("Existing");
    same_id["id"] = json!(id);
    let (status, outcome) = post_validate(&server, &format!("Patient/{id}/$validate?mode=update"), &same_id).await;
    assert_eq!((status, issues_of(&outcome)), (200, vec![("information".to_owned(), String::new())]));
    let (status, outcome) = post_validate(&server, "Patient/missing/$validate?mode=update", &patient("X")).await;
    assert_eq!(status, 200);
    assert!(outcome["issue"][0]["diagnostics"].as_str().is_some_and(|d| d.contains("does not exist")), "{outcome}");
    let delete = json!({"resourceType": "Parameters", "parameter": [{"name": "mode", "valueCode": "delete"}]});
    let (status, outcome) = post_validate(&server, &format!("Patient/{id}/$validate"), &delete).await;
    assert_eq!((status, issues_of(&outcome)), (200, vec![("information".to_owned(), String::new())]));

    // A profile the server does not know is an error issue: the caller asked for exactly it.
    let (status, outcome) =
        post_validate(&server, "Patient/$validate?profile=http://example.org/none", &patient("P")).await;
    assert_eq!(status, 200);
    assert_eq!(outcome["issue"][0]["code"], "not-supported", "{outcome}");

    // What makes validation impossible is a 400: bad JSON, an unknown mode, update without an id.
    let response = server
        .client
        .post(server.url("Patient/$validate"))
        .header("content-type", "application/fhir+json")
        .body("{not json")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 400);
    let (status, outcome) = post_validate(&server, "Patient/$validate?mode=upsert", &patient("P")).await;
    assert_eq!(status, 400);
    assert!(expect_outcome(&outcome).0.contains("unknown $validate mode"));
    let (status, outcome) = post_validate(&server, "Patient/$validate?mode=update", &patient("P")).await;
    assert_eq!(status, 400);
    assert!(expect_outcome(&outcome).0.contains("[type]/[id]/$validate"));
    server.stop().await;
}
