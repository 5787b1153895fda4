//! Shared fixtures: the openssl-generated test keys in `tests/keys/`, their JWKs, token builders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use fhirmesh_authn::{Algorithm, JwksSource, JwtConfig};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://idp.example.org/realms/fhirmesh";
pub const AUDIENCE: &str = "fhirmesh-api";

/// A private test key with the kid and algorithm it signs with, and its public JWK.
pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Value,
}

impl TestKey {
    /// Loads `tests/keys/{file}` and builds its JWK (with `kid`, `use: sig` and `alg`).
    pub fn load(file: &str, kid: &str, alg: Algorithm) -> Self {
        let pem = std::fs::read(keys_dir().join(file)).expect("test key file");
        let encoding = match alg {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .expect("test key pem");
        let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&encoding, alg).expect("jwk")).expect("jwk json");
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        Self { kid: kid.to_owned(), alg, encoding, jwk }
    }

    pub fn rsa_a() -> Self {
        Self::load("rsa-a.pem", "rsa-a", Algorithm::RS256)
    }
    pub fn rsa_b() -> Self {
        Self::load("rsa-b.pem", "rsa-b", Algorithm::RS256)
    }
    /// Not in any JWKS; used to forge signatures under another key's kid.
    pub fn rsa_evil() -> Self {
        Self::load("rsa-evil.pem", "rsa-a", Algorithm::RS256)
    }
    pub fn ec_p256() -> Self {
        Self::load("ec-p256.pem", "ec-p256", Algorithm::ES256)
    }
    pub fn ec_p384() -> Self {
        Self::load("ec-p384.pem", "ec-p384", Algorithm::ES384)
    }
    pub fn ed25519() -> Self {
        Self::load("ed25519.pem", "ed25519", Algorithm::EdDSA)
    }

    /// The JWK without its `alg`, so only the key type constrains the algorithm.
    pub fn jwk_without_alg(&self) -> Value {
        let mut jwk = self.jwk.clone();
        jwk.as_object_mut().expect("jwk object").remove("alg");
        jwk
    }

    /// Signs `claims` with this key, `alg` and `kid` in the header.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with(self.alg, Some(&self.kid), claims)
    }

    pub fn sign_with(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }
}

pub fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("keys")
}

/// The DER bytes of a PEM file (the base64 between the armour lines).
pub fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).expect("pem text");
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body).expect("pem base64")
}

pub fn jwks(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

pub fn now() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()).expect("i64 time")
}

/// Claims that pass every check.
pub fn good_claims() -> Value {
    let now = now();
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "practitioner-42",
        "exp": now + 600,
        "iat": now,
        "nbf": now - 5,
        "scope": "patient/*.read user/Observation.write openid",
        "custom:tenantId": "tenant-a",
        "ext": {"tenant": "tenant-b", "roles": ["clinician", "admin"]},
    })
}

/// `good_claims` with `changes` applied: a `null` value removes the claim.
pub fn claims_with(changes: Value) -> Value {
    let mut claims = good_claims();
    let map = claims.as_object_mut().expect("claims object");
    for (name, value) in changes.as_object().expect("changes object") {
        if value.is_null() {
            map.remove(name);
        } else {
            map.insert(name.clone(), value.clone());
        }
    }
    claims
}

/// A compact JWS from raw parts: base64url(header).base64url(payload).base64url(signature).
pub fn forge(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

pub fn config(jwks: JwksSource) -> JwtConfig {
    JwtConfig::new(ISSUER, vec![AUDIENCE.to_owned(), "other-api".to_owned()], jwks)
}

/// Writes a JWKS file into `dir`.
pub fn write_jwks(dir: &Path, doc: &Value) -> PathBuf {
    let path = dir.join("jwks.json");
    std::fs::write(&path, doc.to_string()).expect("write jwks");
    path
}
