//! No input panics: random bytes, truncations and mutations of a valid token, oversized and deeply
//! nested headers. Seeded, so failures reproduce.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{TestKey, config, forge, good_claims, jwks, write_jwks};
use fhirmesh_authn::{AuthError, JwksSource, MAX_TOKEN_BYTES, Verifier};
use serde_json::json;
use tempfile::TempDir;

async fn verifier(dir: &TempDir) -> (Verifier, TestKey) {
    let rsa = TestKey::rsa_a();
    let path = write_jwks(dir.path(), &jwks(&[rsa.jwk.clone(), TestKey::ec_p256().jwk]));
    (Verifier::new(config(JwksSource::File(path))).await.expect("verifier"), rsa)
}

const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

#[tokio::test]
async fn random_inputs_are_rejected_without_panicking() {
    let dir = TempDir::new().expect("tempdir");
    let (verifier, _) = verifier(&dir).await;
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for round in 0..2000 {
        let len = rng.usize(0..300);
        let token: String = match round % 3 {
            // Arbitrary bytes, lossily as text.
            0 => String::from_utf8_lossy(&(0..len).map(|_| rng.u8(..)).collect::<Vec<_>>()).into(),
            // base64url characters with dots sprinkled in.
            1 => (0..len)
                .map(|_| if rng.u8(..16) == 0 { '.' } else { B64URL[rng.usize(..B64URL.len())] as char })
                .collect(),
            // Three random base64url-encoded parts: decodable, mostly not JSON.
            _ => (0..3)
                .map(|_| URL_SAFE_NO_PAD.encode((0..rng.usize(0..60)).map(|_| rng.u8(..)).collect::<Vec<_>>()))
                .collect::<Vec<_>>()
                .join("."),
        };
        verifier.verify(&token).await.expect_err("random input must be rejected");
    }
}

#[tokio::test]
async fn truncated_and_mutated_tokens_never_verify() {
    let dir = TempDir::new().expect("tempdir");
    let (verifier, rsa) = verifier(&dir).await;
    let token = rsa.sign(&good_claims());
    verifier.verify(&token).await.expect("the original verifies");
    for end in 0..token.len() {
        verifier.verify(&token[..end]).await.expect_err("truncated token must be rejected");
    }
    let mut rng = fastrand::Rng::with_seed(7);
    let bytes = token.as_bytes();
    for _ in 0..400 {
        let mut mutated = bytes.to_vec();
        let at = rng.usize(..mutated.len());
        let replacement = loop {
            let c = if rng.bool() { B64URL[rng.usize(..B64URL.len())] } else { rng.u8(..) };
            if c != mutated[at] {
                break c;
            }
        };
        mutated[at] = replacement;
        let text = String::from_utf8_lossy(&mutated).into_owned();
        verifier.verify(&text).await.expect_err("mutated token must be rejected");
    }
}

#[tokio::test]
async fn huge_and_deeply_nested_headers_are_rejected() {
    let dir = TempDir::new().expect("tempdir");
    let (verifier, _) = verifier(&dir).await;

    let huge =
        forge(&json!({"alg": "RS256", "kid": "rsa-a", "pad": "x".repeat(MAX_TOKEN_BYTES)}), &good_claims(), b"s");
    assert_eq!(verifier.verify(&huge).await, Err(AuthError::Malformed("the token is too large".into())));
    let megabytes = "a".repeat(8 * 1024 * 1024);
    assert!(matches!(verifier.verify(&megabytes).await, Err(AuthError::Malformed(_))));

    // Under the cap but big: parsed, then refused on the signature.
    let big = forge(&json!({"alg": "RS256", "kid": "rsa-a", "pad": "x".repeat(10_000)}), &good_claims(), b"s");
    assert_eq!(verifier.verify(&big).await, Err(AuthError::BadSignature));

    // Nesting deeper than serde_json's recursion limit, in the header and in the payload.
    let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let deep_header = format!("{}.{}.c2ln", URL_SAFE_NO_PAD.encode(&nested), URL_SAFE_NO_PAD.encode("{}"));
    assert!(matches!(verifier.verify(&deep_header).await, Err(AuthError::Malformed(_))));
    let deep_payload = format!(
        "{}.{}.c2ln",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"rsa-a"}"#),
        URL_SAFE_NO_PAD.encode(format!(r#"{{"a":{nested}}}"#))
    );
    assert!(matches!(verifier.verify(&deep_payload).await, Err(AuthError::Malformed(_))));

    // A kid of 10 000 characters: unknown, reported with a short excerpt only.
    let long_kid = forge(&json!({"alg": "RS256", "kid": "k".repeat(10_000)}), &good_claims(), b"s");
    match verifier.verify(&long_kid).await {
        Err(AuthError::UnknownKey(detail)) => assert!(detail.len() < 200, "{detail}"),
        other => panic!("expected UnknownKey, got {other:?}"),
    }
}
