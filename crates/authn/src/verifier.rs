//! Token verification: parse, choose the key, check the signature (jsonwebtoken), check the claims.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};
use tracing::{info, warn};

use crate::claims::Claims;
use crate::config::{ConfigError, JwtConfig};
use crate::error::{AuthError, excerpt};
use crate::jwks::{KeySet, Miss, VerificationKey};
use crate::keystore::KeyStore;

/// Largest token accepted, in bytes; longer ones are [`AuthError::Malformed`] before any decoding.
pub const MAX_TOKEN_BYTES: usize = 32 * 1024;

/// Verifies bearer JWTs against a JWKS. Cheap to clone (an `Arc` inside), `Send + Sync`.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: String,
    audience: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway_secs: i64,
    keys: Arc<KeyStore>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.inner.issuer)
            .field("audience", &self.inner.audience)
            .field("algorithms", &self.inner.algorithms)
            .field("jwks", &self.inner.keys.location())
            .finish_non_exhaustive()
    }
}

/// A token split and decoded, its header checked, its signature not yet verified.
struct Parsed<'t> {
    token: &'t str,
    alg: Algorithm,
    kid: Option<String>,
}

impl Verifier {
    /// Validates the configuration and loads the JWKS once (file read or HTTP GET). Fails when the
    /// JWKS cannot be loaded or has no key usable with the allowed algorithms.
    pub async fn new(config: JwtConfig) -> Result<Verifier, ConfigError> {
        config.validate()?;
        ensure_crypto_provider()?;
        let keys = KeyStore::load(&config.jwks).await?;
        let set = keys.current();
        let usable = set.usable_count(&config.algorithms);
        if usable == 0 {
            return Err(ConfigError::NoUsableKeys { location: config.jwks.location(), algorithms: config.algorithms });
        }
        info!(location = %keys.location(), keys = set.len(), usable, "jwks loaded");
        let leeway_secs = i64::try_from(config.leeway.as_secs()).unwrap_or(i64::MAX);
        Ok(Verifier {
            inner: Arc::new(Inner {
                issuer: config.issuer,
                audience: config.audience,
                algorithms: config.algorithms,
                leeway_secs,
                keys,
            }),
        })
    }

    /// Verifies a compact JWS (the bearer token, without the `Bearer ` prefix) and returns its
    /// claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let parsed = parse(token, &self.inner.algorithms)?;
        let store = &self.inner.keys;
        // The keys as they are when the token arrives; a refresh spawned now serves later tokens.
        let mut keys = store.current();
        store.refresh_if_stale();
        if let Err(miss) = keys.select(parsed.kid.as_deref(), parsed.alg)
            && miss.may_be_rotation()
        {
            keys = store.refetch().await;
        }
        let candidates = keys.select(parsed.kid.as_deref(), parsed.alg).map_err(|m| self.miss(m, &parsed, &keys))?;
        let raw = verify_signature(&parsed, &candidates)?;
        self.check_claims(raw)
    }

    fn miss(&self, miss: Miss, parsed: &Parsed<'_>, keys: &KeySet) -> AuthError {
        if keys.is_empty() {
            let reason = self.inner.keys.last_error().unwrap_or_else(|| "the jwks has no usable key".to_owned());
            return AuthError::KeysUnavailable(reason);
        }
        let alg = parsed.alg;
        let kid = parsed.kid.as_deref().map(excerpt).unwrap_or_default();
        match miss {
            Miss::UnknownKid => AuthError::UnknownKey(format!("no key has kid \"{kid}\"")),
            Miss::WrongKeyType => AuthError::UnsupportedAlgorithm(format!("{alg:?} does not fit key \"{kid}\"")),
            Miss::NoKeyForAlg => AuthError::UnknownKey(format!("the token has no kid and no key fits {alg:?}")),
            Miss::Ambiguous(n) => AuthError::UnknownKey(format!("the token has no kid and {n} keys fit {alg:?}")),
        }
    }

    fn check_claims(&self, raw: Map<String, Value>) -> Result<Claims, AuthError> {
        let now = unix_now();
        let leeway = self.inner.leeway_secs;
        let expires_at = numeric_date(&raw, "exp")?.ok_or(AuthError::MissingClaim("exp"))?;
        if now.saturating_sub(leeway) >= expires_at {
            return Err(AuthError::Expired);
        }
        for name in ["nbf", "iat"] {
            if numeric_date(&raw, name)?.is_some_and(|t| t > now.saturating_add(leeway)) {
                return Err(AuthError::NotYetValid);
            }
        }
        let issuer = match present(&raw, "iss") {
            None => return Err(AuthError::MissingClaim("iss")),
            Some(Value::String(iss)) if *iss == self.inner.issuer => iss.clone(),
            Some(_) => return Err(AuthError::WrongIssuer),
        };
        let audience: Vec<String> = match present(&raw, "aud") {
            None => return Err(AuthError::MissingClaim("aud")),
            Some(Value::String(aud)) => vec![aud.clone()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            Some(_) => return Err(AuthError::WrongAudience),
        };
        if !audience.iter().any(|a| self.inner.audience.contains(a)) {
            return Err(AuthError::WrongAudience);
        }
        let subject = match present(&raw, "sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            None | Some(Value::String(_)) => return Err(AuthError::MissingClaim("sub")),
            Some(_) => return Err(AuthError::Malformed("sub is not a string".into())),
        };
        Ok(Claims { subject, issuer, audience, expires_at, raw })
    }
}

/// Splits the token, decodes its parts and checks the header: `alg` allowed, no `crit`.
fn parse<'t>(token: &'t str, allowed: &[Algorithm]) -> Result<Parsed<'t>, AuthError> {
    let malformed = |what: &str| AuthError::Malformed(what.to_owned());
    if token.len() > MAX_TOKEN_BYTES {
        return Err(malformed("the token is too large"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not three dot-separated parts"));
    };
    let header = URL_SAFE_NO_PAD.decode(header).map_err(|_| malformed("header is not base64url"))?;
    let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| malformed("payload is not base64url"))?;
    URL_SAFE_NO_PAD.decode(signature).map_err(|_| malformed("signature is not base64url"))?;
    let header: Map<String, Value> =
        serde_json::from_slice(&header).map_err(|_| malformed("header is not a json object"))?;
    serde_json::from_slice::<Map<String, Value>>(&payload).map_err(|_| malformed("payload is not a json object"))?;

    let Some(Value::String(alg_name)) = header.get("alg") else {
        return Err(malformed("header has no alg string"));
    };
    let unsupported = || AuthError::UnsupportedAlgorithm(excerpt(alg_name));
    // `none` and unknown names fail to parse; HS* never reaches `allowed` (config validation).
    let alg = Algorithm::from_str(alg_name).map_err(|_| unsupported())?;
    if !allowed.contains(&alg) {
        return Err(unsupported());
    }
    if header.contains_key("crit") {
        return Err(malformed("critical header parameters are not supported"));
    }
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(malformed("kid is not a string")),
    };
    Ok(Parsed { token, alg, kid })
}

/// Checks the signature with each candidate key (several only when a JWKS repeats a `kid`) and
/// returns the payload of the first that verifies.
fn verify_signature(parsed: &Parsed<'_>, candidates: &[&VerificationKey]) -> Result<Map<String, Value>, AuthError> {
    let mut validation = Validation::new(parsed.alg);
    // Only the signature here: the claims are checked by `check_claims`, one variant per failure.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    for key in candidates {
        match jsonwebtoken::decode::<Map<String, Value>>(parsed.token, &key.key, &validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) => match e.kind() {
                ErrorKind::InvalidSignature => {}
                ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidAlgorithmName
                | ErrorKind::UnsupportedAlgorithm
                | ErrorKind::MissingAlgorithm => {
                    return Err(AuthError::UnsupportedAlgorithm(format!("{:?}", parsed.alg)));
                }
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                    return Err(AuthError::Malformed("the jws header is not valid".into()));
                }
                other => {
                    let kid = key.kid.as_deref().map(excerpt);
                    warn!(kid = kid.as_deref().unwrap_or("-"), error = ?other, "jwks key cannot verify");
                }
            },
        }
    }
    Err(AuthError::BadSignature)
}

/// A claim, treating JSON `null` as absent.
fn present<'a>(raw: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    raw.get(name).filter(|v| !v.is_null())
}

/// A NumericDate claim (seconds since the epoch; fractions are truncated).
fn numeric_date(raw: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, AuthError> {
    match present(raw, name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f.floor() as i64))
            .map(Some)
            .ok_or_else(|| AuthError::Malformed(format!("{name} is not a numeric date"))),
        Some(_) => Err(AuthError::Malformed(format!("{name} is not a numeric date"))),
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Makes sure `jsonwebtoken` has a crypto provider, so that `decode` cannot panic for want of one
/// (it would if another crate in the build also enabled its `aws_lc_rs` feature).
fn ensure_crypto_provider() -> Result<(), ConfigError> {
    if CryptoProvider::try_get_default().is_none() {
        // Err means another thread installed one first: fine.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    }
    CryptoProvider::try_get_default().map(|_| ()).ok_or(ConfigError::CryptoProvider)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    fn token(header: &str, payload: &str) -> String {
        format!("{}.{}.c2ln", b64(header), b64(payload))
    }

    const ALLOWED: &[Algorithm] = &[Algorithm::RS256, Algorithm::ES256];

    fn err(token: &str) -> AuthError {
        match parse(token, ALLOWED) {
            Ok(_) => panic!("parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn parse_reads_alg_and_kid() {
        let t = token(r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#, "{}");
        let p = parse(&t, ALLOWED).expect("parsed");
        assert_eq!((p.alg, p.kid.as_deref()), (Algorithm::RS256, Some("k1")));
        let t = token(r#"{"alg":"ES256"}"#, "{}");
        assert_eq!(parse(&t, ALLOWED).expect("parsed").kid, None);
    }

    #[test]
    fn parse_rejects_bad_shapes_as_malformed() {
        for t in [
            String::new(),
            "a.b".into(),
            "a.b.c.d".into(),
            "!!.e30.c2ln".into(),
            format!("{}.e30=.c2ln", b64(r#"{"alg":"RS256"}"#)),
            format!("{}.e30.c2ln=", b64(r#"{"alg":"RS256"}"#)),
            token("not json", "{}"),
            token("[1]", "{}"),
            token(r#"{"alg":"RS256"}"#, "[]"),
            token(r#"{"alg":"RS256"}"#, "nope"),
            token(r#"{"kid":"k"}"#, "{}"),
            token(r#"{"alg":256}"#, "{}"),
            token(r#"{"alg":"RS256","kid":5}"#, "{}"),
            token(r#"{"alg":"RS256","crit":["exp"]}"#, "{}"),
            "x".repeat(MAX_TOKEN_BYTES + 1),
        ] {
            assert!(matches!(err(&t), AuthError::Malformed(_)), "{t:.80}");
        }
    }

    #[test]
    fn parse_rejects_none_unknown_and_disallowed_algorithms() {
        for alg in ["none", "None", "HS256", "RS384", "ES512", "", "RS256 "] {
            let t = token(&format!(r#"{{"alg":"{alg}"}}"#), "{}");
            assert!(matches!(err(&t), AuthError::UnsupportedAlgorithm(_)), "{alg}");
        }
    }

    #[test]
    fn numeric_dates_accept_integers_and_fractions() {
        let raw: Map<String, Value> =
            serde_json::from_str(r#"{"a": 10, "b": 10.9, "c": "10", "d": null, "e": 1e300, "f": -5}"#).expect("json");
        assert_eq!(numeric_date(&raw, "a"), Ok(Some(10)));
        assert_eq!(numeric_date(&raw, "b"), Ok(Some(10)));
        assert!(matches!(numeric_date(&raw, "c"), Err(AuthError::Malformed(_))));
        assert_eq!(numeric_date(&raw, "d"), Ok(None));
        assert_eq!(numeric_date(&raw, "e"), Ok(Some(i64::MAX)));
        assert_eq!(numeric_date(&raw, "f"), Ok(Some(-5)));
        assert_eq!(numeric_date(&raw, "missing"), Ok(None));
    }

    #[test]
    fn verifier_is_send_sync_and_clone() {
        fn assert_traits<T: Send + Sync + Clone + 'static>() {}
        assert_traits::<Verifier>();
    }
}
