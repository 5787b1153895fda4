//! JWKS over HTTP: a tiny axum server on 127.0.0.1:0 serves the key set; the tests rotate keys,
//! break the server and count its requests.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use common::{TestKey, config, good_claims, jwks};
use fhirmesh_authn::{Algorithm, AuthError, ConfigError, JwksSource, Verifier};
use serde_json::Value;

/// What the server answers, and how many requests it has had.
struct Idp {
    response: Mutex<(StatusCode, String)>,
    hits: AtomicUsize,
}

impl Idp {
    fn serve(&self, doc: &Value) {
        self.answer(StatusCode::OK, doc.to_string());
    }
    fn answer(&self, status: StatusCode, body: String) {
        *self.response.lock().expect("idp lock") = (status, body);
    }
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn jwks_handler(State(idp): State<Arc<Idp>>) -> impl IntoResponse {
    idp.hits.fetch_add(1, Ordering::SeqCst);
    let (status, body) = idp.response.lock().expect("idp lock").clone();
    (status, [(header::CONTENT_TYPE, "application/jwk-set+json")], body)
}

/// Starts the server with `doc`; returns its state and the JWKS URL.
async fn start_idp(doc: &Value) -> (Arc<Idp>, String) {
    let idp = Arc::new(Idp { response: Mutex::new((StatusCode::OK, doc.to_string())), hits: AtomicUsize::new(0) });
    let app = Router::new().route("/jwks", get(jwks_handler)).with_state(Arc::clone(&idp));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    (idp, url)
}

async fn verifier(url: &str, refresh: Duration, min_refetch: Duration) -> Verifier {
    let source = JwksSource::Url { url: url.to_owned(), refresh, min_refetch };
    Verifier::new(config(source)).await.expect("verifier")
}

const HOUR: Duration = Duration::from_secs(3600);

/// Polls `cond` for up to 10 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_key_verifies_after_a_refetch() {
    let (a, b) = (TestKey::rsa_a(), TestKey::rsa_b());
    let (idp, url) = start_idp(&jwks(std::slice::from_ref(&a.jwk))).await;
    let verifier = verifier(&url, HOUR, Duration::ZERO).await;
    assert_eq!(idp.hits(), 1, "loaded once at start");

    verifier.verify(&a.sign(&good_claims())).await.expect("known key");
    assert_eq!(idp.hits(), 1, "a known kid needs no fetch");

    // The provider rotates: the new key appears under a new kid.
    idp.serve(&jwks(&[a.jwk.clone(), b.jwk.clone()]));
    let claims = verifier.verify(&b.sign(&good_claims())).await.expect("rotated key");
    assert_eq!(claims.subject, "practitioner-42");
    assert_eq!(idp.hits(), 2, "one refetch for the unknown kid");
    verifier.verify(&b.sign(&good_claims())).await.expect("now cached");
    verifier.verify(&a.sign(&good_claims())).await.expect("old key still listed");
    assert_eq!(idp.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_refetches_are_rate_limited_and_single_flight() {
    let min_refetch = Duration::from_secs(2);
    let (a, b) = (TestKey::rsa_a(), TestKey::rsa_b());
    // Signed up front (RSA signing is slow in debug builds) so the timed sections only verify.
    let junk: Vec<String> =
        (0..20).map(|i| a.sign_with(Algorithm::RS256, Some(&format!("junk-{i}")), &good_claims())).collect();
    let burst: Vec<String> =
        (0..16).map(|i| a.sign_with(Algorithm::RS256, Some(&format!("burst-{i}")), &good_claims())).collect();
    let rotated = b.sign(&good_claims());
    let (idp, url) = start_idp(&jwks(std::slice::from_ref(&a.jwk))).await;
    let verifier = verifier(&url, HOUR, min_refetch).await;
    let started = Instant::now();
    assert_eq!(idp.hits(), 1);

    // Right after the initial load: unknown kids do not reach the provider.
    for token in &junk {
        let err = verifier.verify(token).await.expect_err("unknown kid");
        assert!(matches!(err, AuthError::UnknownKey(_)), "{err:?}");
    }
    assert!(started.elapsed() < min_refetch, "the loop must finish within the window");
    assert_eq!(idp.hits(), 1, "rate-limited");

    // After the window, a burst of concurrent unknown kids causes exactly one fetch, which picks
    // up the rotated key.
    tokio::time::sleep(min_refetch + Duration::from_millis(100)).await;
    idp.serve(&jwks(&[a.jwk.clone(), b.jwk.clone()]));
    let burst_started = Instant::now();
    let tasks: Vec<_> = burst
        .into_iter()
        .map(|token| {
            let verifier = verifier.clone();
            tokio::spawn(async move { verifier.verify(&token).await })
        })
        .collect();
    for task in tasks {
        assert!(matches!(task.await.expect("task"), Err(AuthError::UnknownKey(_))));
    }
    verifier.verify(&rotated).await.expect("rotated key fetched by the burst");
    assert!(burst_started.elapsed() < min_refetch, "the burst must finish within the window");
    assert_eq!(idp.hits(), 2, "one fetch for the whole burst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_failures_keep_the_previous_keys() {
    let a = TestKey::rsa_a();
    let (idp, url) = start_idp(&jwks(std::slice::from_ref(&a.jwk))).await;
    let verifier = verifier(&url, HOUR, Duration::ZERO).await;

    for (status, body) in [
        (StatusCode::INTERNAL_SERVER_ERROR, "oops".to_owned()),
        (StatusCode::OK, "<html>not json</html>".to_owned()),
        (StatusCode::OK, r#"{"no":"keys"}"#.to_owned()),
        (StatusCode::OK, format!(r#"{{"keys":[],"pad":"{}"}}"#, "x".repeat(2 * 1024 * 1024))),
    ] {
        idp.answer(status, body);
        let before = idp.hits();
        let unknown = a.sign_with(Algorithm::RS256, Some("unknown"), &good_claims());
        let err = verifier.verify(&unknown).await.expect_err("unknown kid");
        assert!(matches!(err, AuthError::UnknownKey(_)), "{status}: {err:?}");
        assert_eq!(idp.hits(), before + 1, "a refetch was tried");
        verifier.verify(&a.sign(&good_claims())).await.expect("previous keys kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_unavailable_when_the_provider_publishes_no_usable_key() {
    let a = TestKey::rsa_a();
    let (idp, url) = start_idp(&jwks(std::slice::from_ref(&a.jwk))).await;
    let verifier = verifier(&url, HOUR, Duration::ZERO).await;
    // The provider revokes everything; a token with an unknown kid triggers the refetch.
    idp.serve(&jwks(&[]));
    let unknown = a.sign_with(Algorithm::RS256, Some("unknown"), &good_claims());
    let err = verifier.verify(&unknown).await.expect_err("no keys");
    assert!(matches!(err, AuthError::KeysUnavailable(_)), "{err:?}");
    assert!(!err.is_token_error());
    let err = verifier.verify(&a.sign(&good_claims())).await.expect_err("revoked");
    assert!(matches!(err, AuthError::KeysUnavailable(_)), "{err:?}");
    // Once keys are published again, tokens verify.
    idp.serve(&jwks(std::slice::from_ref(&a.jwk)));
    verifier.verify(&a.sign(&good_claims())).await.expect("keys back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_keys_are_refreshed_in_the_background() {
    let refresh = Duration::from_secs(1);
    let (a, b) = (TestKey::rsa_a(), TestKey::rsa_b());
    let (token_a, token_b) = (a.sign(&good_claims()), b.sign(&good_claims()));
    let (idp, url) = start_idp(&jwks(std::slice::from_ref(&a.jwk))).await;
    let verifier = verifier(&url, refresh, Duration::from_millis(200)).await;
    let loaded = Instant::now();
    idp.serve(&jwks(std::slice::from_ref(&b.jwk))); // the provider retires `a` for `b`
    verifier.verify(&token_a).await.expect("fresh keys: no fetch");
    assert!(loaded.elapsed() < refresh, "the check must run before the keys are stale");
    assert_eq!(idp.hits(), 1);

    tokio::time::sleep(refresh + Duration::from_millis(100)).await;
    // Stale: this request is served from the cache and spawns a refresh.
    verifier.verify(&token_a).await.expect("stale-while-revalidate");
    eventually("the background refresh", || idp.hits() == 2).await;
    // `b` is known once the refresh is stored; a `verify` racing it waits for that fetch rather
    // than starting another (single-flight, then rate-limited).
    verifier.verify(&token_b).await.expect("new key from the background refresh");
    assert_eq!(idp.hits(), 2);
    let err = verifier.verify(&token_a).await.expect_err("retired key");
    assert!(matches!(err, AuthError::UnknownKey(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_fails_clearly_when_the_jwks_cannot_be_fetched() {
    let (idp, url) = start_idp(&jwks(&[])).await;
    idp.answer(StatusCode::NOT_FOUND, "no".into());
    let err = Verifier::new(config(JwksSource::url(&url))).await.expect_err("404");
    assert!(matches!(err, ConfigError::JwksUnavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("404"), "{err}");

    idp.serve(&jwks(&[]));
    let err = Verifier::new(config(JwksSource::url(&url))).await.expect_err("empty");
    assert!(matches!(err, ConfigError::NoUsableKeys { .. }), "{err:?}");

    // Nothing listens on this port any more.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let err =
        Verifier::new(config(JwksSource::url(format!("http://{closed}/jwks")))).await.expect_err("connection refused");
    assert!(matches!(err, ConfigError::JwksUnavailable { .. }), "{err:?}");

    let err = Verifier::new(config(JwksSource::url("http://idp.example.org/jwks"))).await.expect_err("plain http");
    assert!(matches!(err, ConfigError::InvalidUrl { .. }), "{err:?}");
}
