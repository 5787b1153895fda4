//! Authentication, authorization and multi-tenancy over HTTP against the embedded server: the token
//! attack suite (every bad token → 401 with `WWW-Authenticate`), public endpoints, an RBAC matrix
//! and SMART scope checks per interaction, and tenant isolation with look-alike data.
//!
//! Tokens are signed with the test-only keys of `crates/authn/tests/keys`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use fhirmesh::config::{AuthMode, AuthorizationModel};
use fhirmesh_testkit::{TestServer, expect_outcome, status_and_json};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ISSUER: &str = "https://idp.example.org/realms/fhirmesh";
const AUDIENCE: &str = "fhirmesh-api";

fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crates/authn/tests/keys")
}

fn rsa_key(file: &str) -> EncodingKey {
    let pem = std::fs::read(keys_dir().join(file)).expect("test key");
    EncodingKey::from_rsa_pem(&pem).expect("an RSA PEM")
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs() as i64
}

fn sign(key: &EncodingKey, alg: Algorithm, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some("rsa-a".to_owned());
    jsonwebtoken::encode(&header, claims, key).expect("signs")
}

/// Claims of a valid token, with `extra` merged in.
fn claims(extra: Value) -> Value {
    let mut claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "exp": now() + 300, "iat": now()});
    for (key, value) in extra.as_object().expect("an object") {
        claims[key] = value.clone();
    }
    claims
}

fn token(extra: Value) -> String {
    sign(&rsa_key("rsa-a.pem"), Algorithm::RS256, &claims(extra))
}

/// A server with JWT auth (JWKS file holding `rsa-a`) and `model` authorization.
async fn server(model: AuthorizationModel, multi_tenant: bool) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&rsa_key("rsa-a.pem"), Algorithm::RS256).expect("jwk"))
        .expect("jwk json");
    jwk["kid"] = json!("rsa-a");
    jwk["use"] = json!("sig");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).expect("writes the JWKS");
    let server = TestServer::start_with(|config| {
        config.auth.mode = AuthMode::Jwt;
        config.auth.authorization = model;
        config.auth.issuer = Some(ISSUER.to_owned());
        config.auth.audience = vec![AUDIENCE.to_owned()];
        config.auth.jwks_file = Some(jwks.clone());
        config.auth.smart_authorize_url = Some("https://idp.example.org/authorize".to_owned());
        config.auth.smart_token_url = Some("https://idp.example.org/token".to_owned());
        config.tenancy.enabled = multi_tenant;
    })
    .await;
    (server, dir)
}

async fn send(
    server: &TestServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
    let mut request = server.client.request(method, server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.header("content-type", "application/fhir+json").body(body.to_string());
    }
    status_and_json(request.send().await.expect("sent")).await
}

#[tokio::test]
async fn every_bad_token_gets_401_with_a_challenge_and_an_outcome() {
    let (server, _keys) = server(AuthorizationModel::Rbac, false).await;
    let practitioner = json!({"cognito:groups": ["practitioner"]});
    let good = token(practitioner.clone());
    let (status, _) = send(&server, "GET", "Patient", Some(&good), None).await;
    assert_eq!(status, 200, "a valid token is accepted");

    let header_b64 = |header: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header.to_string())
    };
    let body_b64 = header_b64(&claims(practitioner.clone()));
    let public_pem = std::fs::read(keys_dir().join("rsa-a.pub.pem")).expect("public key");
    let attacks: Vec<(&str, String)> = vec![
        ("unsigned (alg none)", format!("{}.{body_b64}.", header_b64(&json!({"alg": "none", "kid": "rsa-a"})))),
        ("wrong key", sign(&rsa_key("rsa-evil.pem"), Algorithm::RS256, &claims(practitioner.clone()))),
        (
            "algorithm confusion (HS256 keyed with the public key)",
            sign(
                &EncodingKey::from_secret(&public_pem).expect("an HMAC key"),
                Algorithm::HS256,
                &claims(practitioner.clone()),
            ),
        ),
        ("expired", token(json!({"cognito:groups": ["practitioner"], "exp": now() - 3600}))),
        ("not yet valid", token(json!({"cognito:groups": ["practitioner"], "nbf": now() + 3600}))),
        ("wrong audience", token(json!({"cognito:groups": ["practitioner"], "aud": "someone-else"}))),
        ("wrong issuer", token(json!({"cognito:groups": ["practitioner"], "iss": "https://evil.example"}))),
        ("malformed", "not-a-jwt".to_owned()),
        ("bad base64", "a.b.c".to_owned()),
    ];
    for (attack, bad) in attacks {
        let response = server.client.get(server.url("Patient")).bearer_auth(&bad).send().await.expect("sent");
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().expect("ascii").to_owned())
            .unwrap_or_default();
        let (status, body) = status_and_json(response).await;
        assert_eq!(status, 401, "{attack}: {body}");
        assert!(challenge.starts_with("Bearer ") && challenge.contains("invalid_token"), "{attack}: {challenge}");
        assert_eq!(body["issue"][0]["code"], "login", "{attack}: {body}");
    }
    // No token at all: a challenge without an error code (RFC 6750 §3).
    let response = server.client.get(server.url("Patient")).send().await.expect("sent");
    assert_eq!(
        response.headers().get("www-authenticate").map(|v| v.to_str().expect("ascii")),
        Some("Bearer realm=\"fhirmesh\"")
    );
    assert_eq!(response.status().as_u16(), 401);
    let (status, _) = status_and_json(
        server.client.get(server.url("Patient")).header("authorization", "Basic dTpw").send().await.expect("sent"),
    )
    .await;
    assert_eq!(status, 401, "a non-bearer scheme");
    server.stop().await;
}

#[tokio::test]
async fn metadata_and_smart_configuration_are_public() {
    let (server, _keys) = server(AuthorizationModel::Smart, false).await;
    let (status, statement) = send(&server, "GET", "metadata", None, None).await;
    assert_eq!(status, 200);
    let security = &statement["rest"][0]["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    assert_eq!(security["extension"][0]["extension"][0]["valueUri"], "https://idp.example.org/authorize");
    let (status, smart) = send(&server, "GET", ".well-known/smart-configuration", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(smart["token_endpoint"], "https://idp.example.org/token");
    assert!(smart["capabilities"].as_array().expect("capabilities").contains(&json!("permission-v2")));
    server.stop().await;

    // Without auth the statement says so loudly, and there is no SMART document.
    let open = TestServer::start().await;
    let (_, statement) = open.get("metadata").await;
    let description = statement["rest"][0]["security"]["description"].as_str().expect("a description");
    assert!(description.starts_with("NO AUTHENTICATION"), "{description}");
    let (status, _) = open.get(".well-known/smart-configuration").await;
    assert_eq!(status, 404);
    open.stop().await;
}

/// Each cell: (group, method, path, body) → expected status, run against one server.
#[tokio::test]
async fn rbac_matrix_over_http() {
    let (server, _keys) = server(AuthorizationModel::Rbac, false).await;
    let admin = token(json!({"cognito:groups": ["practitioner"]}));
    let (status, _) =
        send(&server, "PUT", "Patient/p1", Some(&admin), Some(&json!({"resourceType": "Patient", "id": "p1"}))).await;
    assert_eq!(status, 201);
    let claim = json!({"resourceType": "Claim", "id": "c1", "status": "active", "use": "claim",
        "type": {"coding": [{"code": "oral"}]}, "patient": {"reference": "Patient/p1"}, "created": "2024-01-01",
        "provider": {"reference": "Organization/o1"}, "priority": {"coding": [{"code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/cov1"}}]});
    let (status, body) = send(&server, "PUT", "Claim/c1", Some(&admin), Some(&claim)).await;
    assert_eq!(status, 201, "{body}");

    let new_patient = json!({"resourceType": "Patient"});
    let active_patient = json!({"resourceType": "Patient", "id": "p1", "active": true});
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}}]});
    let cells: Vec<(&str, &str, &str, Option<&Value>, u16)> = vec![
        ("practitioner", "GET", "Patient/p1", None, 200),
        ("practitioner", "POST", "Patient", Some(&new_patient), 201),
        ("practitioner", "GET", "Claim?patient=Patient/p1", None, 200),
        ("practitioner", "GET", "_history", None, 200),
        ("practitioner", "POST", "", Some(&tx), 200),
        ("non-practitioner", "GET", "Claim/c1", None, 200),
        ("non-practitioner", "GET", "Claim/c1/_history/1", None, 200),
        ("non-practitioner", "GET", "Claim?patient=Patient/p1", None, 200),
        // Filtering by a Patient's data needs the right to search Patients.
        ("non-practitioner", "GET", "Claim?patient:Patient.name=x", None, 403),
        ("non-practitioner", "GET", "Claim?_has:ClaimResponse:request:status=active", None, 200),
        ("non-practitioner", "GET", "Claim?_has:Task:focus:status=ready", None, 403),
        ("practitioner", "GET", "Claim?patient:Patient.name=x", None, 200),
        ("non-practitioner", "GET", "Patient/p1", None, 403),
        ("non-practitioner", "POST", "Patient", Some(&new_patient), 403),
        ("non-practitioner", "DELETE", "Claim/c1", None, 403),
        ("non-practitioner", "GET", "_history", None, 403),
        ("non-practitioner", "POST", "", Some(&tx), 403),
        ("auditor", "GET", "Patient/p1", None, 200),
        ("auditor", "GET", "Patient?_id=p1", None, 200),
        ("auditor", "GET", "Claim/c1", None, 403),
        ("auditor", "PUT", "Patient/p1", Some(&active_patient), 403),
        ("auditor", "GET", "Patient/p1/_history", None, 403),
        ("nobody", "GET", "Patient/p1", None, 403),
    ];
    for (group, method, path, body, expected) in cells {
        let token = token(json!({"cognito:groups": [group]}));
        let (status, answer) = send(&server, method, path, Some(&token), body).await;
        assert_eq!(status, expected, "{group} {method} /{path}: {answer}");
        if expected == 403 {
            assert_eq!(answer["issue"][0]["code"], "forbidden", "{group} {method} /{path}: {answer}");
        }
    }
    // A denied read does not say whether the resource exists: same answer for a missing id.
    let auditor = token(json!({"cognito:groups": ["auditor"]}));
    let (exists, a) = send(&server, "GET", "Claim/c1", Some(&auditor), None).await;
    let (missing, b) = send(&server, "GET", "Claim/nope", Some(&auditor), None).await;
    assert_eq!((exists, missing), (403, 403));
    assert_eq!(expect_outcome(&a), expect_outcome(&b));
    // _include never brings in a type the caller may not read.
    let (status, bundle) = send(
        &server,
        "GET",
        "Claim?_include=Claim:patient",
        Some(&token(json!({"cognito:groups": ["non-practitioner"]}))),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let types: Vec<&str> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().expect("type"))
        .collect();
    assert_eq!(types, ["Claim"]);
    let (_, bundle) = send(&server, "GET", "Claim?_include=Claim:patient", Some(&admin), None).await;
    assert_eq!(bundle["entry"].as_array().expect("entries").len(), 2, "a practitioner gets the Patient too");
    server.stop().await;
}

#[tokio::test]
async fn smart_scopes_over_http() {
    let (server, _keys) = server(AuthorizationModel::Smart, false).await;
    let system = token(json!({"scope": "system/*.*"}));
    let (status, _) =
        send(&server, "PUT", "Patient/p1", Some(&system), Some(&json!({"resourceType": "Patient", "id": "p1"}))).await;
    assert_eq!(status, 201);
    let user = |scope: &str| token(json!({"scope": scope, "fhirUser": "Practitioner/dr1"}));
    let cells: Vec<(String, &str, &str, u16)> = vec![
        (user("user/Patient.rs"), "GET", "Patient/p1", 200),
        (user("user/Patient.rs"), "GET", "Patient?_id=p1", 200),
        (user("user/Patient.rs"), "POST", "Patient", 403),
        (user("user/Patient.rs"), "GET", "Observation?subject=Patient/p1", 403),
        (user("user/*.read"), "GET", "Patient/p1", 200),
        (user("user/*.read"), "POST", "Patient", 403),
        (user("user/*.write"), "POST", "Patient", 201),
        (user("user/*.write"), "GET", "Patient/p1", 403),
        (user("user/Patient.cruds"), "POST", "Patient", 201),
        (system.clone(), "GET", "_history", 200),
        (token(json!({"scope": "patient/Patient.rs", "patient": "p1"})), "GET", "Patient/p1", 200),
        // A fine-grained scope the Patient does not match: as if it did not exist.
        (user("user/Patient.rs?gender=female"), "GET", "Patient/p1", 404),
    ];
    for (token, method, path, expected) in cells {
        let body = (method == "POST").then(|| json!({"resourceType": "Patient"}));
        let (status, answer) = send(&server, method, path, Some(&token), body.as_ref()).await;
        assert_eq!(status, expected, "{method} /{path}: {answer}");
    }
    // Unusable tokens: a user/ scope without fhirUser, a patient/ scope without a patient.
    for bad in [token(json!({"scope": "user/Patient.rs"})), token(json!({"scope": "patient/Patient.rs"}))] {
        let (status, _) = send(&server, "GET", "Patient/p1", Some(&bad), None).await;
        assert_eq!(status, 403);
    }
    server.stop().await;
}

/// Two tenants with look-alike data (same ids, same identifiers): nothing of one is ever seen or
/// touched through the other.
#[tokio::test]
async fn tenants_never_see_each_other() {
    let server = TestServer::start_with(|config| config.tenancy.enabled = true).await;
    let patient = |tenant: &str| {
        json!({"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:mrn", "value": "42"}],
               "name": [{"family": format!("Family-{tenant}")}]})
    };
    for tenant in ["a", "b"] {
        let (status, _) =
            send(&server, "PUT", &format!("tenant/{tenant}/Patient/p1"), None, Some(&patient(tenant))).await;
        assert_eq!(status, 201);
    }
    let obs = json!({"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
                     "subject": {"reference": "Patient/p1"}});
    let (status, _) = send(&server, "PUT", "tenant/a/Observation/o1", None, Some(&obs)).await;
    assert_eq!(status, 201);
    let (status, _) = send(
        &server,
        "PUT",
        "tenant/c/Patient/only-c",
        None,
        Some(&json!({"resourceType": "Patient", "id": "only-c"})),
    )
    .await;
    assert_eq!(status, 201);

    // Reads, vreads and history see only the tenant's own version.
    let (_, read) = send(&server, "GET", "tenant/b/Patient/p1", None, None).await;
    assert_eq!(read["name"][0]["family"], "Family-b");
    let (status, _) = send(&server, "GET", "tenant/b/Observation/o1", None, None).await;
    assert_eq!(status, 404);
    let (status, _) = send(&server, "GET", "tenant/b/Observation/o1/_history/1", None, None).await;
    assert_eq!(status, 404);
    let (status, _) = send(&server, "GET", "tenant/a/Patient/only-c", None, None).await;
    assert_eq!(status, 404);
    let (_, history) = send(&server, "GET", "tenant/b/_history", None, None).await;
    assert_eq!(history["entry"].as_array().map_or(0, Vec::len), 1, "{history}");
    // Searches, chains, _has, includes and revincludes stay inside the tenant.
    for (query, expected) in [
        ("Patient?identifier=urn:mrn%7C42", 1),
        ("Observation?subject:Patient.identifier=urn:mrn%7C42", 0),
        ("Patient?_has:Observation:subject:status=final", 0),
        ("Patient?_revinclude=Observation:subject", 1),
        ("Patient?name=Family-a", 0),
    ] {
        let (status, bundle) = send(&server, "GET", &format!("tenant/b/{query}"), None, None).await;
        assert_eq!(status, 200, "{query}: {bundle}");
        let entries = bundle["entry"].as_array().map_or(0, Vec::len);
        assert_eq!(entries, expected, "tenant b, {query}: {bundle}");
    }
    let (_, bundle) = send(&server, "GET", "tenant/a/Patient?_revinclude=Observation:subject", None, None).await;
    assert_eq!(bundle["entry"].as_array().map_or(0, Vec::len), 2, "tenant a sees its own Observation");
    // Conditional operations and transaction references resolve within the tenant only.
    let (status, _) = send(&server, "DELETE", "tenant/b/Observation?subject=Patient/p1", None, None).await;
    assert!(status == 200 || status == 204, "{status}");
    let (status, _) = send(&server, "GET", "tenant/a/Observation/o1", None, None).await;
    assert_eq!(status, 200, "tenant b's conditional delete did not touch tenant a");
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Observation"}, "resource": {"resourceType": "Observation",
         "status": "final", "code": {"text": "y"}, "subject": {"reference": "Patient?identifier=urn:mrn|nope-only-in-a"}}}]});
    let (_, _) = send(
        &server,
        "PUT",
        "tenant/a/Patient/p2",
        None,
        Some(&json!({"resourceType": "Patient", "id": "p2",
        "identifier": [{"system": "urn:mrn", "value": "nope-only-in-a"}]})),
    )
    .await;
    let (status, body) = send(&server, "POST", "tenant/b", None, Some(&tx)).await;
    assert!(
        status == 400 || status == 412,
        "a conditional reference to tenant a's data fails in tenant b: {status} {body}"
    );
    // _include follows references inside the tenant: Patient/p1 is tenant b's own.
    let obs_b = json!({"resourceType": "Observation", "id": "ob", "status": "final", "code": {"text": "x"},
                       "subject": {"reference": "Patient/p1"}});
    let (status, _) = send(&server, "PUT", "tenant/b/Observation/ob", None, Some(&obs_b)).await;
    assert_eq!(status, 201);
    let (_, bundle) = send(&server, "GET", "tenant/b/Observation?_include=Observation:subject", None, None).await;
    let families: Vec<&str> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["resource"]["name"][0]["family"].as_str())
        .collect();
    assert_eq!(families, ["Family-b"], "{bundle}");
    // Conditional create: tenant a's match does not count in tenant b.
    let response = server
        .client
        .post(server.url("tenant/b/Patient"))
        .header("content-type", "application/fhir+json")
        .header("if-none-exist", "identifier=urn:mrn|nope-only-in-a")
        .body(
            json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "nope-only-in-a"}]})
                .to_string(),
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 201, "created in tenant b although tenant a has a match");
    // The CapabilityStatement's base is the tenant's; a request without a tenant goes nowhere.
    let (_, statement) = send(&server, "GET", "tenant/b/metadata", None, None).await;
    assert!(statement["implementation"]["url"].as_str().expect("url").ends_with("/tenant/b"), "{statement}");
    let (status, _) = send(&server, "GET", "Patient/p1", None, None).await;
    assert_eq!(status, 404);
    let (status, _) = send(&server, "GET", "tenant/no%20spaces/Patient/p1", None, None).await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn a_token_only_opens_its_own_tenant() {
    let (server, _keys) = server(AuthorizationModel::Rbac, true).await;
    let for_a = token(json!({"cognito:groups": ["practitioner"], "custom:tenantId": "a"}));
    let (status, _) = send(
        &server,
        "PUT",
        "tenant/a/Patient/p1",
        Some(&for_a),
        Some(&json!({"resourceType": "Patient", "id": "p1"})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = send(&server, "GET", "tenant/b/Patient/p1", Some(&for_a), None).await;
    assert_eq!(status, 403, "a token for tenant a on tenant b");
    let no_tenant = token(json!({"cognito:groups": ["practitioner"]}));
    let (status, _) = send(&server, "GET", "tenant/a/Patient/p1", Some(&no_tenant), None).await;
    assert_eq!(status, 403, "a token without a tenant claim");
    let (status, _) = send(&server, "GET", "tenant/a/Patient/p1", Some(&for_a), None).await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// A patient-scoped token sees its own patient's compartment and nothing else — through reads,
/// vreads, history, searches, includes, revincludes and chains — and writes only inside it.
#[tokio::test]
async fn a_patient_token_sees_only_its_compartment() {
    let (server, _keys) = server(AuthorizationModel::Smart, false).await;
    let system = token(json!({"scope": "system/*.*"}));
    let put = |path: &'static str, body: Value| {
        let (server, system) = (&server, system.clone());
        async move {
            let (status, answer) = send(server, "PUT", path, Some(&system), Some(&body)).await;
            assert_eq!(status, 201, "{path}: {answer}");
        }
    };
    let observation = |id: &str, patient: &str| {
        json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "heart rate"},
               "subject": {"reference": format!("Patient/{patient}")}})
    };
    put("Patient/p1", json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Shared"}]})).await;
    put("Patient/p2", json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Shared"}]})).await;
    put("Observation/o1", observation("o1", "p1")).await;
    put("Observation/o2", observation("o2", "p2")).await;
    put("Medication/m1", json!({"resourceType": "Medication", "id": "m1"})).await;

    let own = token(json!({"scope": "launch/patient patient/Observation.cruds patient/Patient.rs", "patient": "p1"}));
    let ids = |bundle: &Value| -> Vec<String> {
        let mut ids: Vec<String> = bundle["entry"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| {
                        format!(
                            "{}/{}",
                            e["resource"]["resourceType"].as_str().expect("type"),
                            e["resource"]["id"].as_str().expect("id")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    };
    for (path, expected) in [
        ("Observation/o1", 200),
        ("Observation/o2", 404),
        ("Observation/o1/_history/1", 200),
        ("Observation/o2/_history/1", 404),
        ("Observation/o1/_history", 200),
        ("Observation/o2/_history", 404),
        ("Patient/p1", 200),
        ("Patient/p2", 404),
        ("Observation/nope", 404),
        ("Medication/m1", 403),
    ] {
        let (status, body) = send(&server, "GET", path, Some(&own), None).await;
        assert_eq!(status, expected, "GET {path}: {body}");
    }
    for (query, expected) in [
        ("Observation", vec!["Observation/o1"]),
        ("Observation?code:text=heart", vec!["Observation/o1"]),
        ("Observation?subject:Patient.name=Shared", vec!["Observation/o1"]),
        ("Observation?_include=Observation:subject", vec!["Observation/o1", "Patient/p1"]),
        ("Patient", vec!["Patient/p1"]),
        ("Patient?name=Shared&_revinclude=Observation:subject", vec!["Observation/o1", "Patient/p1"]),
        ("Patient/p1/Observation", vec!["Observation/o1"]),
    ] {
        let (status, bundle) = send(&server, "GET", query, Some(&own), None).await;
        assert_eq!(status, 200, "{query}: {bundle}");
        assert_eq!(ids(&bundle), expected, "{query}");
    }
    let (status, history) = send(&server, "GET", "Observation/_history", Some(&own), None).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&history), ["Observation/o1"], "type history shows only the compartment's versions");
    for query in ["Medication", "Patient/p2/Observation"] {
        let (status, _) = send(&server, "GET", query, Some(&own), None).await;
        assert_eq!(status, 403, "{query}");
    }
    // Writes stay inside the compartment.
    let (status, _) = send(&server, "POST", "Observation", Some(&own), Some(&observation("x", "p1"))).await;
    assert_eq!(status, 201);
    let (status, _) = send(&server, "POST", "Observation", Some(&own), Some(&observation("x", "p2"))).await;
    assert_eq!(status, 403, "creating another patient's Observation");
    let (status, _) = send(&server, "PUT", "Observation/o2", Some(&own), Some(&observation("o2", "p1"))).await;
    assert_eq!(status, 404, "taking over another patient's Observation");
    let (status, _) = send(&server, "PUT", "Observation/o1", Some(&own), Some(&observation("o1", "p2"))).await;
    assert_eq!(status, 403, "moving an Observation out of the compartment");
    let (status, _) = send(&server, "DELETE", "Observation/o2", Some(&own), None).await;
    assert_eq!(status, 404);
    // Conditional writes do not see what is outside the compartment.
    let (status, _) = send(&server, "DELETE", "Observation?_id=o2", Some(&own), None).await;
    assert!(status == 200 || status == 204, "no reachable match is not an error: {status}");
    let mut moved = observation("o2", "p1");
    moved.as_object_mut().expect("object").remove("id");
    let (status, answer) = send(&server, "PUT", "Observation?_id=o2", Some(&own), Some(&moved)).await;
    assert_eq!(status, 201, "no reachable match: a new Observation in the compartment: {answer}");
    assert_ne!(answer["id"], "o2");
    let (status, _) = send(&server, "GET", "Observation/o2", Some(&system), None).await;
    assert_eq!(status, 200, "o2 untouched");
    let (_, o2) = send(&server, "GET", "Observation/o2", Some(&system), None).await;
    assert_eq!(o2["subject"]["reference"], "Patient/p2");
    // A transaction's writes must stay in the compartment, or none happens.
    let tx = |patient: &str| {
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "POST", "url": "Observation"}, "resource": observation("t", "p1")},
            {"request": {"method": "POST", "url": "Observation"}, "resource": observation("t", patient)}]})
    };
    let (status, answer) = send(&server, "POST", "", Some(&own), Some(&tx("p1"))).await;
    assert_eq!(status, 200, "{answer}");
    let (_, before) = send(&server, "GET", "Observation?_total=accurate", Some(&system), None).await;
    let (status, answer) = send(&server, "POST", "", Some(&own), Some(&tx("p2"))).await;
    assert_eq!(status, 403, "{answer}");
    let (_, after) = send(&server, "GET", "Observation?_total=accurate", Some(&system), None).await;
    assert_eq!(before["total"], after["total"], "nothing of the refused transaction was written");
    // A batch checks each entry where it runs.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/o1"}},
        {"request": {"method": "GET", "url": "Observation/o2"}}]});
    let (status, answer) = send(&server, "POST", "", Some(&own), Some(&batch)).await;
    assert_eq!(status, 200, "{answer}");
    let statuses: Vec<&str> = answer["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["response"]["status"].as_str().expect("status"))
        .collect();
    assert_eq!(statuses, ["200 OK", "404 Not Found"]);
    server.stop().await;
}

/// A Binary is in no compartment: a patient token reaches it through its `securityContext`, the
/// resource standing in for its sensitivity (the patient, or a resource in the patient's
/// compartment), for reads, raw reads and writes.
#[tokio::test]
async fn a_patient_token_reaches_binaries_through_their_security_context() {
    let (server, _keys) = server(AuthorizationModel::Smart, false).await;
    let system = token(json!({"scope": "system/*.*"}));
    let put = |path: String, body: Value| {
        let (server, system) = (&server, system.clone());
        async move {
            let (status, answer) = send(server, "PUT", &path, Some(&system), Some(&body)).await;
            assert_eq!(status, 201, "{path}: {answer}");
        }
    };
    for patient in ["p1", "p2"] {
        put(format!("Patient/{patient}"), json!({"resourceType": "Patient", "id": patient})).await;
        put(
            format!("DocumentReference/d{patient}"),
            json!({"resourceType": "DocumentReference", "id": format!("d{patient}"), "status": "current",
                   "subject": {"reference": format!("Patient/{patient}")},
                   "content": [{"attachment": {"contentType": "text/plain"}}]}),
        )
        .await;
    }
    let binary = |id: &str, context: Option<&str>| {
        let mut binary = json!({"resourceType": "Binary", "id": id, "contentType": "text/plain", "data": "aGk="});
        if let Some(reference) = context {
            binary["securityContext"] = json!({"reference": reference});
        }
        binary
    };
    for (id, context) in [
        ("b-p1", Some("Patient/p1")),
        ("b-p2", Some("Patient/p2")),
        ("b-doc1", Some("DocumentReference/dp1")),
        ("b-doc2", Some("DocumentReference/dp2")),
        ("b-missing", Some("DocumentReference/nowhere")),
        ("b-none", None),
    ] {
        put(format!("Binary/{id}"), binary(id, context)).await;
    }

    let own = token(json!({"scope": "launch/patient patient/Binary.cr", "patient": "p1"}));
    for (path, expected) in [
        ("Binary/b-p1?_format=json", 200),
        ("Binary/b-doc1?_format=json", 200),
        ("Binary/b-doc1/_history/1?_format=json", 200),
        ("Binary/b-p2?_format=json", 404),
        ("Binary/b-doc2?_format=json", 404),
        ("Binary/b-doc2/_history/1?_format=json", 404),
        ("Binary/b-missing?_format=json", 404),
        ("Binary/b-none?_format=json", 404),
    ] {
        let (status, body) = send(&server, "GET", path, Some(&own), None).await;
        assert_eq!(status, expected, "GET {path}: {body}");
    }
    // The raw content follows the same rule.
    for (id, expected) in [("b-doc1", 200), ("b-doc2", 404)] {
        let response = server
            .client
            .get(server.url(&format!("Binary/{id}")))
            .bearer_auth(&own)
            .header("accept", "*/*")
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), expected, "raw {id}");
        if expected == 200 {
            assert_eq!(response.bytes().await.expect("body").as_ref(), b"hi");
        }
    }
    // A raw upload lands only in the token's own patient's context.
    for (context, expected) in [("Patient/p1", 201), ("Patient/p2", 403)] {
        let response = server
            .client
            .post(server.url("Binary"))
            .bearer_auth(&own)
            .header("content-type", "application/pdf")
            .header("x-security-context", context)
            .body(b"%PDF".to_vec())
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), expected, "upload with {context}");
    }
    server.stop().await;
}

/// Kicks off `path` with `token`: the status URL, or the refusal's status.
async fn kick_off_export(server: &TestServer, path: &str, token: &str, body: Option<&Value>) -> Result<String, u16> {
    let url = server.url(path);
    let request = match body {
        Some(body) => server.client.post(url).header("content-type", "application/fhir+json").body(body.to_string()),
        None => server.client.get(url),
    };
    let response = request.bearer_auth(token).header("prefer", "respond-async").send().await.expect("sent");
    if response.status() != 202 {
        return Err(response.status().as_u16());
    }
    Ok(response.headers()["content-location"].to_str().expect("ascii").to_owned())
}

/// The `Type/id`s an export holds, once it completes (bounded wait), fetched with `token`.
async fn exported_ids(server: &TestServer, status_url: &str, token: &str) -> Vec<String> {
    let mut manifest = None;
    for _ in 0..200 {
        let response = server.client.get(status_url).bearer_auth(token).send().await.expect("status");
        if response.status() == 200 {
            manifest = Some(response.json::<Value>().await.expect("manifest"));
            break;
        }
        assert_eq!(response.status(), 202);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let manifest = manifest.expect("the export completes within 10 s");
    assert_eq!(manifest["requiresAccessToken"], true);
    let mut ids = Vec::new();
    for file in manifest["output"].as_array().expect("output") {
        let url = file["url"].as_str().expect("url");
        let text = server.client.get(url).bearer_auth(token).send().await.expect("file").text().await.expect("ndjson");
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).expect("a resource per line");
            ids.push(format!(
                "{}/{}",
                resource["resourceType"].as_str().expect("type"),
                resource["id"].as_str().expect("id")
            ));
        }
    }
    ids.sort();
    ids
}

/// `$export` follows the token: system exports need unrestricted search on what they export; a
/// patient token exports its own patient's compartment at Patient level, and nothing else.
#[tokio::test]
async fn exports_follow_the_token_s_scopes() {
    let (server, _keys) = server(AuthorizationModel::Smart, false).await;
    let system = token(json!({"scope": "system/*.*"}));
    for (path, body) in [
        ("Patient/p1", json!({"resourceType": "Patient", "id": "p1"})),
        ("Patient/p2", json!({"resourceType": "Patient", "id": "p2"})),
        (
            "Observation/o1",
            json!({"resourceType": "Observation", "id": "o1", "status": "final",
            "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}}),
        ),
        (
            "Observation/o2",
            json!({"resourceType": "Observation", "id": "o2", "status": "final",
            "code": {"text": "x"}, "subject": {"reference": "Patient/p2"}}),
        ),
        ("Medication/m1", json!({"resourceType": "Medication", "id": "m1"})),
    ] {
        let (status, answer) = send(&server, "PUT", path, Some(&system), Some(&body)).await;
        assert_eq!(status, 201, "{path}: {answer}");
    }

    let everything = ["Medication/m1", "Observation/o1", "Observation/o2", "Patient/p1", "Patient/p2"];
    let status_url = kick_off_export(&server, "$export", &system, None).await.expect("system export");
    assert_eq!(exported_ids(&server, &status_url, &system).await, everything);

    // A system token for Patient only: no system export (that needs a scope on every type), and
    // at Patient level only Patients.
    let patients_only = token(json!({"scope": "system/Patient.rs"}));
    assert_eq!(kick_off_export(&server, "$export", &patients_only, None).await, Err(403));
    assert_eq!(kick_off_export(&server, "Patient/$export?_type=Observation", &patients_only, None).await, Err(403));
    let status_url = kick_off_export(&server, "Patient/$export", &patients_only, None).await.expect("Patient export");
    assert_eq!(exported_ids(&server, &status_url, &patients_only).await, ["Patient/p1", "Patient/p2"]);

    // A patient token: its own compartment at Patient level, nothing at system or Group level.
    let own = token(json!({"scope": "launch/patient patient/*.rs", "patient": "p1"}));
    assert_eq!(kick_off_export(&server, "$export", &own, None).await, Err(403));
    assert_eq!(kick_off_export(&server, "Group/g1/$export", &own, None).await, Err(403));
    let others = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": "Patient/p2"}}]});
    assert_eq!(kick_off_export(&server, "Patient/$export", &own, Some(&others)).await, Err(403));
    let status_url = kick_off_export(&server, "Patient/$export", &own, None).await.expect("own compartment");
    assert_eq!(exported_ids(&server, &status_url, &own).await, ["Observation/o1", "Patient/p1"]);
    server.stop().await;
}

/// SMART v2 fine-grained scopes (`?category=…`): searches are narrowed, reads of anything else look
/// like misses, and writes must match.
#[tokio::test]
async fn fine_grained_scopes_narrow_what_a_token_reaches() {
    let (server, _keys) = server(AuthorizationModel::Smart, false).await;
    let system = token(json!({"scope": "system/*.*"}));
    const CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
    let observation = |id: &str, category: &str| {
        json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"},
               "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
               "subject": {"reference": "Patient/p1"}})
    };
    for (id, category) in [("lab1", "laboratory"), ("vit1", "vital-signs"), ("soc1", "social-history")] {
        let path = format!("Observation/{id}");
        let (status, _) = send(&server, "PUT", &path, Some(&system), Some(&observation(id, category))).await;
        assert_eq!(status, 201);
    }
    let labs = token(json!({"fhirUser": "Practitioner/dr1",
        "scope": format!("user/Observation.cruds?category={CATEGORY}|laboratory")}));
    let ids = |bundle: &Value| -> Vec<String> {
        let mut ids: Vec<String> = bundle["entry"].as_array().map_or_else(Vec::new, |entries| {
            entries.iter().map(|e| e["resource"]["id"].as_str().expect("id").to_owned()).collect()
        });
        ids.sort();
        ids
    };
    let (status, bundle) = send(&server, "GET", "Observation", Some(&labs), None).await;
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(ids(&bundle), ["lab1"]);
    let (status, _) = send(&server, "GET", "Observation/lab1", Some(&labs), None).await;
    assert_eq!(status, 200);
    let (status, _) = send(&server, "GET", "Observation/vit1", Some(&labs), None).await;
    assert_eq!(status, 404);
    let (status, _) = send(&server, "POST", "Observation", Some(&labs), Some(&observation("n1", "laboratory"))).await;
    assert_eq!(status, 201);
    let (status, _) = send(&server, "POST", "Observation", Some(&labs), Some(&observation("n2", "vital-signs"))).await;
    assert_eq!(status, 403);
    let (status, _) =
        send(&server, "PUT", "Observation/lab1", Some(&labs), Some(&observation("lab1", "vital-signs"))).await;
    assert_eq!(status, 403, "a write may not move a resource out of the scope");
    // Two scopes on the same parameter are ORed.
    let two = token(json!({"fhirUser": "Practitioner/dr1", "scope": format!(
        "user/Observation.rs?category={CATEGORY}|laboratory user/Observation.rs?category={CATEGORY}|vital-signs")}));
    let (status, bundle) = send(&server, "GET", "Observation?status=final", Some(&two), None).await;
    assert_eq!(status, 200, "{bundle}");
    let found = ids(&bundle);
    assert_eq!(found.len(), 3, "lab1, vit1 and the created laboratory one: {found:?}");
    assert!(
        found.contains(&"lab1".to_owned()) && found.contains(&"vit1".to_owned()) && !found.contains(&"soc1".to_owned())
    );
    server.stop().await;
}

/// With `audit.store_events`, every FHIR request also leaves an AuditEvent resource saying who
/// did what to which resource, with what outcome.
#[tokio::test]
async fn requests_leave_audit_events_when_asked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&rsa_key("rsa-a.pem"), Algorithm::RS256).expect("jwk"))
        .expect("jwk json");
    jwk["kid"] = json!("rsa-a");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).expect("writes the JWKS");
    let server = TestServer::start_with(|config| {
        config.auth.mode = AuthMode::Jwt;
        config.auth.issuer = Some(ISSUER.to_owned());
        config.auth.audience = vec![AUDIENCE.to_owned()];
        config.auth.jwks_file = Some(jwks.clone());
        config.audit.store_events = true;
    })
    .await;
    let admin = token(json!({"cognito:groups": ["practitioner"], "sub": "auditor-test-user"}));
    let (status, _) =
        send(&server, "PUT", "Patient/a1", Some(&admin), Some(&json!({"resourceType": "Patient", "id": "a1"}))).await;
    assert_eq!(status, 201);
    let (status, _) = send(&server, "GET", "Patient/a1", Some(&admin), None).await;
    assert_eq!(status, 200);
    let (status, _) = send(&server, "GET", "Patient/missing", Some(&admin), None).await;
    assert_eq!(status, 404);

    // Stored off the request path: wait (bounded) until all three are searchable.
    let mut events = Vec::new();
    for _ in 0..100 {
        let (_, bundle) = send(&server, "GET", "AuditEvent?_count=100", Some(&admin), None).await;
        events = bundle["entry"].as_array().cloned().unwrap_or_default();
        let about_patients = events
            .iter()
            .filter(|e| {
                e["resource"]["entity"][0]["what"]["reference"].as_str().is_some_and(|r| r.starts_with("Patient/"))
            })
            .count();
        if about_patients >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let find = |reference: &str, interaction: &str| {
        events
            .iter()
            .map(|e| &e["resource"])
            .find(|e| e["entity"][0]["what"]["reference"] == reference && e["subtype"][0]["code"] == interaction)
            .cloned()
            .unwrap_or_else(|| panic!("an AuditEvent for {interaction} of {reference} in {events:?}"))
    };
    let update = find("Patient/a1", "update");
    assert_eq!((update["action"].as_str(), update["outcome"].as_str()), (Some("U"), Some("0")));
    assert_eq!(update["agent"][0]["who"]["identifier"]["value"], "auditor-test-user");
    assert_eq!(update["agent"][0]["network"]["address"], "127.0.0.1");
    let read = find("Patient/a1", "read");
    assert_eq!((read["action"].as_str(), read["outcome"].as_str()), (Some("R"), Some("0")));
    let missing = find("Patient/missing", "read");
    assert_eq!(missing["outcome"], "4", "a failed request is recorded as a minor failure");
    server.stop().await;
}
