//! The token attack suite, against a JWKS file: each case asserts the exact `AuthError`.

mod common;

use std::time::Duration;

use common::{
    AUDIENCE, ISSUER, TestKey, claims_with, config, forge, good_claims, jwks, keys_dir, now, pem_to_der, write_jwks,
};
use fhirmesh_authn::{Algorithm, AuthError, ConfigError, JwksSource, JwtConfig, Verifier};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use tempfile::TempDir;

/// A verifier over a JWKS file holding `rsa-a` (no `alg` in its JWK, so only its type constrains
/// the algorithm), `ec-p256` (with `alg`) and `ec-p384` (no `alg`).
struct Fixture {
    _dir: TempDir,
    verifier: Verifier,
    rsa: TestKey,
    ec: TestKey,
    ec384: TestKey,
}

async fn fixture() -> Fixture {
    fixture_with(|_| {}).await
}

async fn fixture_with(adjust: impl FnOnce(&mut JwtConfig)) -> Fixture {
    let (rsa, ec, ec384) = (TestKey::rsa_a(), TestKey::ec_p256(), TestKey::ec_p384());
    let dir = TempDir::new().expect("tempdir");
    let path = write_jwks(dir.path(), &jwks(&[rsa.jwk_without_alg(), ec.jwk.clone(), ec384.jwk_without_alg()]));
    let mut config = config(JwksSource::File(path));
    adjust(&mut config);
    let verifier = Verifier::new(config).await.expect("verifier");
    Fixture { _dir: dir, verifier, rsa, ec, ec384 }
}

impl Fixture {
    async fn err(&self, token: &str) -> AuthError {
        self.verifier.verify(token).await.expect_err("token must be rejected")
    }
}

#[tokio::test]
async fn valid_rs256_token_is_accepted_with_its_claims() {
    let f = fixture().await;
    let claims = good_claims();
    let verified = f.verifier.verify(&f.rsa.sign(&claims)).await.expect("valid token");
    assert_eq!(verified.subject, "practitioner-42");
    assert_eq!(verified.issuer, ISSUER);
    assert_eq!(verified.audience, [AUDIENCE]);
    assert_eq!(verified.expires_at, claims["exp"].as_i64().expect("exp"));
    assert_eq!(verified.get("custom:tenantId"), Some(&json!("tenant-a")));
    assert_eq!(verified.get("ext.tenant"), Some(&json!("tenant-b")));
    assert_eq!(verified.strings("ext.roles"), ["clinician", "admin"]);
    assert_eq!(verified.strings("scope"), ["patient/*.read", "user/Observation.write", "openid"]);
    assert_eq!(Value::Object(verified.raw), claims);
}

#[tokio::test]
async fn valid_es256_token_is_accepted() {
    let f = fixture().await;
    let verified = f.verifier.verify(&f.ec.sign(&good_claims())).await.expect("valid token");
    assert_eq!(verified.subject, "practitioner-42");
}

#[tokio::test]
async fn es384_ps256_and_eddsa_tokens_are_accepted_when_allowed() {
    let ed = TestKey::ed25519();
    let rsa = TestKey::rsa_a();
    let ec384 = TestKey::ec_p384();
    let dir = TempDir::new().expect("tempdir");
    let path = write_jwks(dir.path(), &jwks(&[rsa.jwk_without_alg(), ec384.jwk.clone(), ed.jwk.clone()]));
    let mut config = config(JwksSource::File(path));
    config.algorithms = vec![Algorithm::ES384, Algorithm::EdDSA, Algorithm::PS256];
    let verifier = Verifier::new(config).await.expect("verifier");
    for token in [
        ec384.sign(&good_claims()),
        ed.sign(&good_claims()),
        rsa.sign_with(Algorithm::PS256, Some("rsa-a"), &good_claims()),
    ] {
        verifier.verify(&token).await.expect("valid token");
    }
    // RS256 is no longer in the allow-list.
    let err = verifier.verify(&rsa.sign(&good_claims())).await.expect_err("rs256 refused");
    assert!(matches!(err, AuthError::UnsupportedAlgorithm(_)), "{err:?}");
}

#[tokio::test]
async fn audience_array_needs_one_accepted_value() {
    let f = fixture().await;
    let ok = claims_with(json!({"aud": ["someone-else", "other-api"]}));
    assert_eq!(f.verifier.verify(&f.rsa.sign(&ok)).await.expect("ok").audience, ["someone-else", "other-api"]);
    let wrong = claims_with(json!({"aud": ["someone-else", "x"]}));
    assert_eq!(f.err(&f.rsa.sign(&wrong)).await, AuthError::WrongAudience);
    let empty = claims_with(json!({"aud": []}));
    assert_eq!(f.err(&f.rsa.sign(&empty)).await, AuthError::WrongAudience);
    let not_string = claims_with(json!({"aud": 42}));
    assert_eq!(f.err(&f.rsa.sign(&not_string)).await, AuthError::WrongAudience);
}

#[tokio::test]
async fn unsigned_alg_none_tokens_are_rejected() {
    let f = fixture().await;
    for header in [
        json!({"alg": "none"}),
        json!({"alg": "none", "typ": "JWT", "kid": "rsa-a"}),
        json!({"alg": "None", "kid": "rsa-a"}),
        json!({"alg": "NONE"}),
        json!({"alg": "nOnE"}),
    ] {
        let token = forge(&header, &good_claims(), b"");
        assert!(token.ends_with('.'), "empty signature part");
        let err = f.err(&token).await;
        assert!(matches!(err, AuthError::UnsupportedAlgorithm(_)), "{header}: {err:?}");
        // With a bogus signature too.
        let err = f.err(&forge(&header, &good_claims(), b"sig")).await;
        assert!(matches!(err, AuthError::UnsupportedAlgorithm(_)), "{header}: {err:?}");
    }
}

#[tokio::test]
async fn empty_or_garbage_signature_is_bad_signature() {
    let f = fixture().await;
    let header = json!({"alg": "RS256", "kid": "rsa-a"});
    assert_eq!(f.err(&forge(&header, &good_claims(), b"")).await, AuthError::BadSignature);
    assert_eq!(f.err(&forge(&header, &good_claims(), &[0u8; 256])).await, AuthError::BadSignature);
    let header = json!({"alg": "ES256", "kid": "ec-p256"});
    assert_eq!(f.err(&forge(&header, &good_claims(), &[1u8; 64])).await, AuthError::BadSignature);
    assert_eq!(f.err(&forge(&header, &good_claims(), &[1u8; 3])).await, AuthError::BadSignature);
}

#[tokio::test]
async fn signature_by_a_key_outside_the_jwks_under_a_known_kid_is_bad_signature() {
    let f = fixture().await;
    let evil = TestKey::rsa_evil();
    assert_eq!(evil.kid, "rsa-a");
    assert_eq!(f.err(&evil.sign(&good_claims())).await, AuthError::BadSignature);
}

#[tokio::test]
async fn tampered_payload_is_bad_signature() {
    let f = fixture().await;
    let token = f.rsa.sign(&good_claims());
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let forged = forge(&json!({}), &claims_with(json!({"sub": "admin"})), b"");
    parts[1] = forged.split('.').nth(1).expect("payload").to_owned();
    assert_eq!(f.err(&parts.join(".")).await, AuthError::BadSignature);
}

/// Algorithm confusion: HS256 "signed" with the RSA public key (PEM text or DER bytes) as the HMAC
/// secret, under the RSA key's kid. HS* can never be allowed, so the algorithm is refused before
/// any key is used.
#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_unsupported_algorithm() {
    let f = fixture().await;
    let public_pem = std::fs::read(keys_dir().join("rsa-a.pub.pem")).expect("public pem");
    for secret in [public_pem.clone(), pem_to_der(&public_pem)] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa-a".into());
        let token =
            jsonwebtoken::encode(&header, &good_claims(), &EncodingKey::from_secret(&secret).expect("hmac key"))
                .expect("sign");
        let err = f.err(&token).await;
        assert_eq!(err, AuthError::UnsupportedAlgorithm("HS256".into()));
        // No kid: still refused on the algorithm.
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &good_claims(),
            &EncodingKey::from_secret(&secret).expect("hmac key"),
        )
        .expect("sign");
        assert_eq!(f.err(&token).await, AuthError::UnsupportedAlgorithm("HS256".into()));
    }
}

#[tokio::test]
async fn hmac_algorithms_cannot_be_configured() {
    let dir = TempDir::new().expect("tempdir");
    let path = write_jwks(dir.path(), &jwks(&[TestKey::rsa_a().jwk]));
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let mut config = config(JwksSource::File(path.clone()));
        config.algorithms.push(alg);
        let err = Verifier::new(config).await.expect_err("hmac refused");
        assert!(matches!(err, ConfigError::SymmetricAlgorithm(a) if a == alg), "{err:?}");
    }
}

#[tokio::test]
async fn allowed_algorithm_that_does_not_fit_the_key_type_is_unsupported_algorithm() {
    let f = fixture_with(|c| c.algorithms = vec![Algorithm::RS256, Algorithm::ES256, Algorithm::ES384]).await;
    // ES256 header, RSA kid (signed with the EC key so only the key choice can refuse it).
    let err = f.err(&f.ec.sign_with(Algorithm::ES256, Some("rsa-a"), &good_claims())).await;
    assert!(matches!(err, AuthError::UnsupportedAlgorithm(_)), "{err:?}");
    // RS256 header, EC kid.
    let err = f.err(&f.rsa.sign_with(Algorithm::RS256, Some("ec-p256"), &good_claims())).await;
    assert!(matches!(err, AuthError::UnsupportedAlgorithm(_)), "{err:?}");
    // ES256 header, P-384 kid (curve mismatch), and ES384 header, P-256 kid.
    let err = f.err(&f.ec.sign_with(Algorithm::ES256, Some("ec-p384"), &good_claims())).await;
    assert!(matches!(err, AuthError::UnsupportedAlgorithm(_)), "{err:?}");
    let err = f.err(&f.ec384.sign_with(Algorithm::ES384, Some("ec-p256"), &good_claims())).await;
    assert!(matches!(err, AuthError::UnsupportedAlgorithm(_)), "{err:?}");
    // The same keys with matching kids are fine.
    f.verifier.verify(&f.ec384.sign(&good_claims())).await.expect("es384");
}

#[tokio::test]
async fn the_jwk_alg_pins_the_key_to_one_algorithm() {
    let rsa = TestKey::rsa_b(); // its JWK says "alg": "RS256"
    let dir = TempDir::new().expect("tempdir");
    let path = write_jwks(dir.path(), &jwks(std::slice::from_ref(&rsa.jwk)));
    let mut config = config(JwksSource::File(path));
    config.algorithms = vec![Algorithm::RS256, Algorithm::PS256];
    let verifier = Verifier::new(config).await.expect("verifier");
    verifier.verify(&rsa.sign(&good_claims())).await.expect("rs256");
    let ps256 = rsa.sign_with(Algorithm::PS256, Some("rsa-b"), &good_claims());
    let err = verifier.verify(&ps256).await.expect_err("ps256 refused");
    assert!(matches!(err, AuthError::UnsupportedAlgorithm(_)), "{err:?}");
}

#[tokio::test]
async fn algorithm_outside_the_allow_list_is_unsupported_algorithm() {
    let f = fixture().await;
    for alg in [Algorithm::RS384, Algorithm::RS512, Algorithm::PS256] {
        let err = f.err(&f.rsa.sign_with(alg, Some("rsa-a"), &good_claims())).await;
        assert_eq!(err, AuthError::UnsupportedAlgorithm(format!("{alg:?}")));
    }
    let err = f.err(&forge(&json!({"alg": "ES512", "kid": "ec-p256"}), &good_claims(), b"x")).await;
    assert_eq!(err, AuthError::UnsupportedAlgorithm("ES512".into()));
}

#[tokio::test]
async fn expiry_is_checked_with_leeway() {
    let f = fixture().await;
    let now = now();
    let beyond = claims_with(json!({"exp": now - 61, "iat": now - 700, "nbf": null}));
    assert_eq!(f.err(&f.rsa.sign(&beyond)).await, AuthError::Expired);
    let within = claims_with(json!({"exp": now - 30, "iat": now - 700, "nbf": null}));
    f.verifier.verify(&f.rsa.sign(&within)).await.expect("within the 60 s leeway");
    let long_ago = claims_with(json!({"exp": 1, "iat": null, "nbf": null}));
    assert_eq!(f.err(&f.rsa.sign(&long_ago)).await, AuthError::Expired);

    let strict = fixture_with(|c| c.leeway = Duration::ZERO).await;
    let just_expired = claims_with(json!({"exp": now - 2}));
    assert_eq!(strict.err(&strict.rsa.sign(&just_expired)).await, AuthError::Expired);
}

#[tokio::test]
async fn nbf_or_iat_in_the_future_is_not_yet_valid() {
    let f = fixture().await;
    let now = now();
    let nbf = claims_with(json!({"nbf": now + 3600}));
    assert_eq!(f.err(&f.rsa.sign(&nbf)).await, AuthError::NotYetValid);
    let iat = claims_with(json!({"iat": now + 3600}));
    assert_eq!(f.err(&f.rsa.sign(&iat)).await, AuthError::NotYetValid);
    let skewed = claims_with(json!({"nbf": now + 30, "iat": now + 30}));
    f.verifier.verify(&f.rsa.sign(&skewed)).await.expect("within the 60 s leeway");
    let absent = claims_with(json!({"nbf": null, "iat": null}));
    f.verifier.verify(&f.rsa.sign(&absent)).await.expect("nbf and iat are optional");
}

#[tokio::test]
async fn wrong_or_missing_audience() {
    let f = fixture().await;
    let wrong = claims_with(json!({"aud": "another-api"}));
    assert_eq!(f.err(&f.rsa.sign(&wrong)).await, AuthError::WrongAudience);
    let missing = claims_with(json!({"aud": null}));
    assert_eq!(f.err(&f.rsa.sign(&missing)).await, AuthError::MissingClaim("aud"));
}

#[tokio::test]
async fn wrong_or_missing_issuer() {
    let f = fixture().await;
    for iss in [json!("https://evil.example.org"), json!(format!("{ISSUER}/")), json!([ISSUER]), json!(7)] {
        let wrong = claims_with(json!({ "iss": iss }));
        assert_eq!(f.err(&f.rsa.sign(&wrong)).await, AuthError::WrongIssuer, "{iss}");
    }
    let missing = claims_with(json!({"iss": null}));
    assert_eq!(f.err(&f.rsa.sign(&missing)).await, AuthError::MissingClaim("iss"));
}

#[tokio::test]
async fn missing_exp_or_sub_is_missing_claim() {
    let f = fixture().await;
    let no_exp = claims_with(json!({"exp": null}));
    assert_eq!(f.err(&f.rsa.sign(&no_exp)).await, AuthError::MissingClaim("exp"));
    let no_sub = claims_with(json!({"sub": null}));
    assert_eq!(f.err(&f.rsa.sign(&no_sub)).await, AuthError::MissingClaim("sub"));
    let empty_sub = claims_with(json!({"sub": ""}));
    assert_eq!(f.err(&f.rsa.sign(&empty_sub)).await, AuthError::MissingClaim("sub"));
    let mut explicit_null = good_claims();
    explicit_null["exp"] = Value::Null;
    assert_eq!(f.err(&f.rsa.sign(&explicit_null)).await, AuthError::MissingClaim("exp"));
}

#[tokio::test]
async fn registered_claims_of_the_wrong_type_are_malformed() {
    let f = fixture().await;
    for bad in [json!({"exp": "tomorrow"}), json!({"nbf": true}), json!({"iat": [1]}), json!({"sub": 42})] {
        let err = f.err(&f.rsa.sign(&claims_with(bad.clone()))).await;
        assert!(matches!(err, AuthError::Malformed(_)), "{bad}: {err:?}");
    }
}

#[tokio::test]
async fn malformed_tokens_are_malformed() {
    let f = fixture().await;
    let valid = f.rsa.sign(&good_claims());
    let parts: Vec<&str> = valid.split('.').collect();
    let header_not_json = format!("{}.{}.{}", "bm90IGpzb24", parts[1], parts[2]);
    let payload_not_json = format!("{}.{}.{}", parts[0], "bm90IGpzb24", parts[2]);
    let header_array = forge(&json!(["RS256"]), &good_claims(), b"x");
    let no_alg = forge(&json!({"kid": "rsa-a"}), &good_claims(), b"x");
    let kid_number = forge(&json!({"alg": "RS256", "kid": 1}), &good_claims(), b"x");
    let crit = forge(&json!({"alg": "RS256", "kid": "rsa-a", "crit": ["exp"], "exp": 1}), &good_claims(), b"x");
    for token in [
        String::new(),
        ".".into(),
        "..".into(),
        "...".into(),
        "abc".into(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{valid}.extra"),
        format!("{}.{}.{}", "%%%", parts[1], parts[2]),
        format!("{}.{}.{}", parts[0], "a+b/", parts[2]),
        format!("{}.{}.{}", parts[0], parts[1], "not*base64"),
        format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
        format!(" {valid}"),
        format!("Bearer {valid}"),
        header_not_json,
        payload_not_json,
        header_array,
        no_alg,
        kid_number,
        crit,
    ] {
        let err = f.err(&token).await;
        assert!(matches!(err, AuthError::Malformed(_)), "{token:.60}: {err:?}");
    }
}

#[tokio::test]
async fn unknown_kid_with_a_file_jwks_is_unknown_key() {
    let f = fixture().await;
    let token = f.rsa.sign_with(Algorithm::RS256, Some("rotated-away"), &good_claims());
    let err = f.err(&token).await;
    assert!(matches!(err, AuthError::UnknownKey(_)), "{err:?}");
    assert!(!err.description().contains("rotated-away"));
}

#[tokio::test]
async fn token_without_kid_needs_exactly_one_fitting_key() {
    let f = fixture().await;
    // One RSA key and one P-256 key: either alg picks its only key.
    f.verifier.verify(&f.rsa.sign_with(Algorithm::RS256, None, &good_claims())).await.expect("rs256");
    f.verifier.verify(&f.ec.sign_with(Algorithm::ES256, None, &good_claims())).await.expect("es256");
    let evil = TestKey::rsa_evil();
    assert_eq!(f.err(&evil.sign_with(Algorithm::RS256, None, &good_claims())).await, AuthError::BadSignature);

    // Two RSA keys: ambiguous.
    let (a, b) = (TestKey::rsa_a(), TestKey::rsa_b());
    let dir = TempDir::new().expect("tempdir");
    let path = write_jwks(dir.path(), &jwks(&[a.jwk.clone(), b.jwk.clone()]));
    let verifier = Verifier::new(config(JwksSource::File(path))).await.expect("verifier");
    let err = verifier.verify(&a.sign_with(Algorithm::RS256, None, &good_claims())).await;
    assert!(matches!(err, Err(AuthError::UnknownKey(_))), "{err:?}");
    verifier.verify(&a.sign(&good_claims())).await.expect("with its kid");
    verifier.verify(&b.sign(&good_claims())).await.expect("with its kid");
}

#[tokio::test]
async fn unusable_jwks_keys_are_ignored_without_failing() {
    let rsa = TestKey::rsa_a();
    let mut enc = TestKey::rsa_b().jwk;
    enc["use"] = json!("enc");
    enc["kid"] = json!("enc-key");
    let dir = TempDir::new().expect("tempdir");
    let path = write_jwks(
        dir.path(),
        &jwks(&[
            json!({"kty": "oct", "kid": "shared", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"}),
            json!({"kty": "RSA", "kid": "weird"}),
            json!({"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"}),
            json!({"kty": "PQC", "kid": "future"}),
            enc,
            rsa.jwk.clone(),
        ]),
    );
    let verifier = Verifier::new(config(JwksSource::File(path))).await.expect("verifier");
    verifier.verify(&rsa.sign(&good_claims())).await.expect("usable key");
    // The encryption key is not a signing key, even under its own kid.
    let token = TestKey::rsa_b().sign_with(Algorithm::RS256, Some("enc-key"), &good_claims());
    assert!(matches!(verifier.verify(&token).await, Err(AuthError::UnknownKey(_))));
    // An HMAC token under the oct key's kid.
    let hs = jsonwebtoken::encode(
        &{
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("shared".into());
            h
        },
        &good_claims(),
        &EncodingKey::from_secret(b"secret-secret-secret").expect("hmac key"),
    )
    .expect("sign");
    assert_eq!(verifier.verify(&hs).await, Err(AuthError::UnsupportedAlgorithm("HS256".into())));
}

#[tokio::test]
async fn start_up_fails_clearly_without_usable_keys() {
    let dir = TempDir::new().expect("tempdir");
    let missing = dir.path().join("missing.json");
    let err = Verifier::new(config(JwksSource::File(missing))).await.expect_err("missing file");
    assert!(matches!(err, ConfigError::JwksUnavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.json"), "{err}");

    let not_json = dir.path().join("bad.json");
    std::fs::write(&not_json, "<html>").expect("write");
    let err = Verifier::new(config(JwksSource::File(not_json))).await.expect_err("not json");
    assert!(err.to_string().contains("not valid json"), "{err}");

    // Only an EC key, but only RS256 allowed.
    let path = write_jwks(dir.path(), &jwks(&[TestKey::ec_p256().jwk]));
    let mut rs_only = config(JwksSource::File(path));
    rs_only.algorithms = vec![Algorithm::RS256];
    let err = Verifier::new(rs_only).await.expect_err("no usable key");
    assert!(matches!(err, ConfigError::NoUsableKeys { .. }), "{err:?}");
}
