//! Parsing a JWKS (RFC 7517) into the public keys this crate can verify with, and choosing the key
//! for a token. Pure: no I/O.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tracing::warn;

use crate::error::excerpt;

/// RFC 7518 §3.3: RSA keys for RS*/PS* must be 2048 bits or larger.
const MIN_RSA_BITS: usize = 2048;

/// The key types this crate verifies with; each fits a fixed set of JWS algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyType {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyType {
    /// Whether a key of this type may verify `alg` (the defence against algorithm confusion).
    pub(crate) fn fits(self, alg: Algorithm) -> bool {
        match self {
            Self::Rsa => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            Self::P256 => alg == Algorithm::ES256,
            Self::P384 => alg == Algorithm::ES384,
            Self::Ed25519 => alg == Algorithm::EdDSA,
        }
    }
}

/// One public signing key from the JWKS.
pub(crate) struct VerificationKey {
    pub(crate) kid: Option<String>,
    pub(crate) key_type: KeyType,
    /// The JWK's `alg`, when it names one: the key then verifies that algorithm only.
    pub(crate) alg: Option<Algorithm>,
    pub(crate) key: DecodingKey,
}

impl VerificationKey {
    pub(crate) fn fits(&self, alg: Algorithm) -> bool {
        self.key_type.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// The usable keys of a JWKS.
#[derive(Default)]
pub(crate) struct KeySet {
    keys: Vec<VerificationKey>,
}

/// Why no key was chosen for a token.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Miss {
    /// No key has the token's `kid`.
    UnknownKid,
    /// Keys have the token's `kid`, but none fits the token's `alg`.
    WrongKeyType,
    /// The token has no `kid` and no key fits its `alg`.
    NoKeyForAlg,
    /// The token has no `kid` and this many keys fit its `alg`.
    Ambiguous(usize),
}

impl Miss {
    /// Whether a fresh copy of the JWKS could resolve the miss (key rotation).
    pub(crate) fn may_be_rotation(&self) -> bool {
        matches!(self, Self::UnknownKid | Self::NoKeyForAlg)
    }
}

/// The JWKS document as a whole is unusable.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JwksError {
    #[error("the jwks is not valid json")]
    NotJson,
    #[error("the jwks is not a json object with a \"keys\" array")]
    NoKeysArray,
}

impl KeySet {
    /// Parses a JWKS, skipping (with a warning) keys that are not for signatures, of an unsupported
    /// type or curve, symmetric, too weak, or malformed. Fails only if the document is not a JWKS.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, JwksError> {
        let doc: Value = serde_json::from_slice(bytes).map_err(|_| JwksError::NotJson)?;
        let Some(Value::Array(entries)) = doc.get("keys") else {
            return Err(JwksError::NoKeysArray);
        };
        let mut keys = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            match parse_key(entry) {
                Ok(key) => keys.push(key),
                Err(reason) => {
                    let kid = entry.get("kid").and_then(Value::as_str).map(excerpt);
                    warn!(index, kid = kid.as_deref().unwrap_or("-"), reason, "jwks key ignored");
                }
            }
        }
        Ok(Self { keys })
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many keys fit at least one of `algorithms`.
    pub(crate) fn usable_count(&self, algorithms: &[Algorithm]) -> usize {
        self.keys.iter().filter(|k| algorithms.iter().any(|a| k.fits(*a))).count()
    }

    /// The keys to try for a token: those with its `kid` that fit its `alg`; without a `kid`, the
    /// only key that fits its `alg`.
    pub(crate) fn select(&self, kid: Option<&str>, alg: Algorithm) -> Result<Vec<&VerificationKey>, Miss> {
        match kid {
            Some(kid) => {
                let mut same_kid = self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid));
                let first = same_kid.next().ok_or(Miss::UnknownKid)?;
                let fitting: Vec<_> = std::iter::once(first).chain(same_kid).filter(|k| k.fits(alg)).collect();
                if fitting.is_empty() { Err(Miss::WrongKeyType) } else { Ok(fitting) }
            }
            None => {
                let fitting: Vec<_> = self.keys.iter().filter(|k| k.fits(alg)).collect();
                match fitting.len() {
                    0 => Err(Miss::NoKeyForAlg),
                    1 => Ok(fitting),
                    n => Err(Miss::Ambiguous(n)),
                }
            }
        }
    }
}

fn parse_key(entry: &Value) -> Result<VerificationKey, &'static str> {
    let jwk: Jwk = serde_json::from_value(entry.clone()).map_err(|_| "not a valid jwk")?;
    let common = &jwk.common;
    if common.public_key_use.as_ref().is_some_and(|u| *u != PublicKeyUse::Signature) {
        return Err("use is not sig");
    }
    if common.key_operations.as_ref().is_some_and(|ops| !ops.contains(&KeyOperations::Verify)) {
        return Err("key_ops lacks verify");
    }
    let alg = match common.key_algorithm {
        None => None,
        Some(named) => Some(Algorithm::try_from(named).map_err(|_| "alg is not a jws algorithm")?),
    };
    let (key_type, key) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let n = b64(&p.n)?;
            let e = b64(&p.e)?;
            let n = trim_leading_zeros(&n);
            let e = trim_leading_zeros(&e);
            if n.len() * 8 < MIN_RSA_BITS {
                return Err("rsa modulus shorter than 2048 bits");
            }
            if e.is_empty() || e.len() > 8 {
                return Err("rsa exponent out of range");
            }
            (KeyType::Rsa, DecodingKey::from_rsa_raw_components(n, e))
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let (key_type, len) = match p.curve {
                EllipticCurve::P256 => (KeyType::P256, 32),
                EllipticCurve::P384 => (KeyType::P384, 48),
                _ => return Err("unsupported ec curve"),
            };
            let (x, y) = (b64(&p.x)?, b64(&p.y)?);
            if x.len() != len || y.len() != len {
                return Err("ec coordinates have the wrong length for the curve");
            }
            let key = DecodingKey::from_ec_components(&URL_SAFE_NO_PAD.encode(x), &URL_SAFE_NO_PAD.encode(y))
                .map_err(|_| "invalid ec coordinates")?;
            (key_type, key)
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            if p.curve != EllipticCurve::Ed25519 {
                return Err("unsupported okp curve");
            }
            let x = b64(&p.x)?;
            if x.len() != 32 {
                return Err("ed25519 key has the wrong length");
            }
            let key = DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(x)).map_err(|_| "invalid ed25519 key")?;
            (KeyType::Ed25519, key)
        }
        AlgorithmParameters::OctetKey(_) => return Err("symmetric (oct) keys are never used"),
        _ => return Err("unsupported key type"),
    };
    if alg.is_some_and(|a| !key_type.fits(a)) {
        return Err("alg does not fit the key type");
    }
    Ok(VerificationKey { kid: common.key_id.clone(), key_type, alg, key })
}

/// base64url, tolerating the padding some providers add.
fn b64(text: &str) -> Result<Vec<u8>, &'static str> {
    URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).map_err(|_| "key material is not base64url")
}

fn trim_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rsa(kid: &str) -> Value {
        json!({"kty": "RSA", "kid": kid, "n": URL_SAFE_NO_PAD.encode([0xc5; 256]), "e": "AQAB"})
    }

    fn ec(kid: &str, crv: &str, len: usize) -> Value {
        let coord = URL_SAFE_NO_PAD.encode(vec![7u8; len]);
        json!({"kty": "EC", "kid": kid, "crv": crv, "x": coord, "y": coord})
    }

    fn set(keys: Vec<Value>) -> KeySet {
        let doc = serde_json::to_vec(&json!({ "keys": keys })).expect("json");
        KeySet::parse(&doc).expect("jwks")
    }

    fn kids(set: &KeySet) -> Vec<Option<&str>> {
        set.keys.iter().map(|k| k.kid.as_deref()).collect()
    }

    #[test]
    fn documents_that_are_not_a_jwks_fail() {
        assert!(matches!(KeySet::parse(b"not json"), Err(JwksError::NotJson)));
        assert!(matches!(KeySet::parse(b"[]"), Err(JwksError::NoKeysArray)));
        assert!(matches!(KeySet::parse(br#"{"keys": {}}"#), Err(JwksError::NoKeysArray)));
        assert!(KeySet::parse(br#"{"keys": []}"#).expect("empty").is_empty());
    }

    #[test]
    fn unusable_keys_are_skipped_without_failing() {
        let mut enc = rsa("enc");
        enc["use"] = json!("enc");
        let mut wrap = rsa("wrap");
        wrap["key_ops"] = json!(["wrapKey"]);
        let mut oaep = rsa("oaep");
        oaep["alg"] = json!("RSA-OAEP");
        let mut mismatched = rsa("mismatched");
        mismatched["alg"] = json!("ES256");
        let short = json!({"kty": "RSA", "kid": "short", "n": URL_SAFE_NO_PAD.encode([0xc5; 128]), "e": "AQAB"});
        let mut padded = rsa("padded");
        padded["n"] = json!(format!("{}==", URL_SAFE_NO_PAD.encode([0xc5; 256])));
        let mut verify_only = rsa("verify-only");
        verify_only["key_ops"] = json!(["verify"]);
        verify_only["use"] = json!("sig");
        verify_only["alg"] = json!("PS256");
        let keys = set(vec![
            rsa("good"),
            enc,
            wrap,
            oaep,
            mismatched,
            short,
            padded,
            verify_only,
            json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}),
            json!({"kty": "OKP", "kid": "x448", "crv": "X448", "x": "AAAA"}),
            json!({"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"}),
            json!({"kty": "EC", "kid": "k1", "crv": "secp256k1", "x": "AA", "y": "AA"}),
            ec("p256-short", "P-256", 31),
            ec("p256", "P-256", 32),
            ec("p384", "P-384", 48),
            json!({"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode([1; 32])}),
            json!({"kty": "RSA", "kid": "bad-b64", "n": "!!!", "e": "AQAB"}),
            json!({"kty": "XYZ", "kid": "other"}),
            json!("not an object"),
            json!(42),
        ]);
        assert_eq!(
            kids(&keys),
            [Some("good"), Some("padded"), Some("verify-only"), Some("p256"), Some("p384"), Some("ed")]
        );
        assert_eq!(keys.usable_count(&[Algorithm::RS256]), 2);
        assert_eq!(keys.usable_count(&[Algorithm::PS256]), 3);
        assert_eq!(keys.usable_count(&[Algorithm::ES256, Algorithm::ES384]), 2);
        assert_eq!(keys.len(), 6);
    }

    #[test]
    fn keys_fit_only_their_algorithms() {
        assert!(KeyType::Rsa.fits(Algorithm::PS512));
        assert!(!KeyType::Rsa.fits(Algorithm::ES256));
        assert!(!KeyType::Rsa.fits(Algorithm::HS256));
        assert!(KeyType::P256.fits(Algorithm::ES256));
        assert!(!KeyType::P256.fits(Algorithm::ES384));
        assert!(!KeyType::P384.fits(Algorithm::ES256));
        assert!(!KeyType::Ed25519.fits(Algorithm::ES256));
        for t in [KeyType::Rsa, KeyType::P256, KeyType::P384, KeyType::Ed25519] {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                assert!(!t.fits(alg));
            }
        }
    }

    #[test]
    fn selection_by_kid_and_by_uniqueness() {
        let keys = set(vec![rsa("r1"), rsa("r2"), ec("e1", "P-256", 32)]);
        assert_eq!(keys.select(Some("r1"), Algorithm::RS256).map(|v| v.len()), Ok(1));
        assert_eq!(keys.select(Some("zz"), Algorithm::RS256).err(), Some(Miss::UnknownKid));
        assert_eq!(keys.select(Some("r1"), Algorithm::ES256).err(), Some(Miss::WrongKeyType));
        assert_eq!(keys.select(None, Algorithm::RS256).err(), Some(Miss::Ambiguous(2)));
        assert_eq!(keys.select(None, Algorithm::ES256).map(|v| v.len()), Ok(1));
        assert_eq!(keys.select(None, Algorithm::ES384).err(), Some(Miss::NoKeyForAlg));
        assert!(Miss::UnknownKid.may_be_rotation() && Miss::NoKeyForAlg.may_be_rotation());
        assert!(!Miss::WrongKeyType.may_be_rotation() && !Miss::Ambiguous(2).may_be_rotation());
    }
}
