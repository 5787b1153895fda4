//! The verifier's configuration and its start-up validation.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily};

/// Default clock skew allowed on `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
/// Default interval after which a JWKS fetched from a URL is refreshed.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Default minimum interval between two JWKS fetches (initial load included), which rate-limits
/// the refetch a token with an unknown `kid` triggers.
pub const DEFAULT_MIN_REFETCH: Duration = Duration::from_secs(30);

/// How bearer tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// The required `iss`, compared exactly.
    pub issuer: String,
    /// Accepted `aud` values: the token's `aud` (a string or an array) must contain one of them.
    pub audience: Vec<String>,
    /// Allowed signing algorithms; default `[RS256, ES256]`. HS* is refused at start-up.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`; default 60 s.
    pub leeway: Duration,
    /// Where the signing keys come from.
    pub jwks: JwksSource,
}

impl JwtConfig {
    /// A configuration with the default algorithms (`RS256`, `ES256`) and leeway (60 s).
    pub fn new(issuer: impl Into<String>, audience: Vec<String>, jwks: JwksSource) -> Self {
        Self {
            issuer: issuer.into(),
            audience,
            algorithms: vec![Algorithm::RS256, Algorithm::ES256],
            leeway: DEFAULT_LEEWAY,
            jwks,
        }
    }

    /// Checks the configuration, with a message naming the field at fault.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.issuer.trim().is_empty() {
            return Err(ConfigError::EmptyIssuer);
        }
        if self.audience.is_empty() || self.audience.iter().any(|a| a.trim().is_empty()) {
            return Err(ConfigError::NoAudience);
        }
        if self.algorithms.is_empty() {
            return Err(ConfigError::NoAlgorithms);
        }
        if let Some(alg) = self.algorithms.iter().find(|a| a.family() == AlgorithmFamily::Hmac) {
            return Err(ConfigError::SymmetricAlgorithm(*alg));
        }
        if let JwksSource::Url { url, .. } = &self.jwks {
            check_url(url)?;
        }
        Ok(())
    }
}

/// Where the JWKS (RFC 7517 key set) is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JWKS file, read at start and re-read (rate-limited by [`DEFAULT_MIN_REFETCH`]) when a
    /// token names an unknown `kid`.
    File(PathBuf),
    /// A JWKS URL (`https://`, or `http://` to a loopback address only), cached.
    Url {
        /// The JWKS location, e.g. the `jwks_uri` of the provider's discovery document.
        url: String,
        /// Age after which the cached keys are refreshed in the background; default 5 min.
        refresh: Duration,
        /// Minimum interval between fetches; a token with an unknown `kid` triggers a refetch at
        /// most this often (key rotation); default 30 s.
        min_refetch: Duration,
    },
}

impl JwksSource {
    /// A URL source with the default `refresh` (5 min) and `min_refetch` (30 s).
    pub fn url(url: impl Into<String>) -> Self {
        Self::Url { url: url.into(), refresh: DEFAULT_REFRESH, min_refetch: DEFAULT_MIN_REFETCH }
    }

    /// A human-readable location for messages.
    pub(crate) fn location(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::Url { url, .. } => url.clone(),
        }
    }
}

/// The configuration is invalid, or the JWKS could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("jwt issuer must not be empty")]
    EmptyIssuer,
    #[error("jwt audience must list at least one non-empty value")]
    NoAudience,
    #[error("jwt algorithms must list at least one algorithm")]
    NoAlgorithms,
    #[error(
        "jwt algorithm {0:?} is not allowed: HMAC algorithms need a shared secret, and a JWKS publishes public keys"
    )]
    SymmetricAlgorithm(Algorithm),
    #[error("invalid jwks url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("cannot build the jwks http client: {0}")]
    HttpClient(String),
    #[error("cannot load the jwks from {location}: {reason}")]
    JwksUnavailable { location: String, reason: String },
    #[error("the jwks from {location} has no key usable with the allowed algorithms {algorithms:?}")]
    NoUsableKeys { location: String, algorithms: Vec<Algorithm> },
    #[error("no jsonwebtoken crypto provider could be installed")]
    CryptoProvider,
}

/// `https://`, or `http://` to a loopback host (local development and tests): a JWKS fetched in
/// clear text from elsewhere could be replaced by anyone on the path.
pub(crate) fn check_url(raw: &str) -> Result<reqwest::Url, ConfigError> {
    let invalid = |reason| ConfigError::InvalidUrl { url: raw.to_owned(), reason };
    let url = reqwest::Url::parse(raw).map_err(|_| invalid("not an absolute url"))?;
    if url.host().is_none() {
        return Err(invalid("no host"));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(invalid("plain http is only allowed to a loopback address; use https")),
        _ => Err(invalid("the scheme must be https")),
    }
}

pub(crate) fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(jwks: JwksSource) -> JwtConfig {
        JwtConfig::new("https://idp.example", vec!["fhirmesh".into()], jwks)
    }

    #[test]
    fn defaults_are_rs256_es256_and_sixty_seconds() {
        let c = config(JwksSource::url("https://idp.example/jwks"));
        assert_eq!(c.algorithms, vec![Algorithm::RS256, Algorithm::ES256]);
        assert_eq!(c.leeway, Duration::from_secs(60));
        let JwksSource::Url { refresh, min_refetch, .. } = c.jwks else { panic!("url source") };
        assert_eq!((refresh, min_refetch), (Duration::from_secs(300), Duration::from_secs(30)));
        assert!(config(JwksSource::File("k.json".into())).validate().is_ok());
    }

    #[test]
    fn hmac_algorithms_are_refused() {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let mut c = config(JwksSource::File("k.json".into()));
            c.algorithms.push(alg);
            assert!(matches!(c.validate(), Err(ConfigError::SymmetricAlgorithm(a)) if a == alg));
        }
    }

    #[test]
    fn empty_fields_are_refused() {
        let mut c = config(JwksSource::File("k.json".into()));
        c.issuer = " ".into();
        assert!(matches!(c.validate(), Err(ConfigError::EmptyIssuer)));
        let mut c = config(JwksSource::File("k.json".into()));
        c.audience.clear();
        assert!(matches!(c.validate(), Err(ConfigError::NoAudience)));
        let mut c = config(JwksSource::File("k.json".into()));
        c.algorithms.clear();
        assert!(matches!(c.validate(), Err(ConfigError::NoAlgorithms)));
    }

    #[test]
    fn jwks_urls_must_be_https_unless_loopback() {
        for ok in ["https://idp.example/jwks", "http://127.0.0.1:8080/jwks", "http://localhost/k", "http://[::1]:1/k"] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for bad in ["http://idp.example/jwks", "ftp://idp.example/jwks", "/jwks", "idp.example", ""] {
            assert!(matches!(check_url(bad), Err(ConfigError::InvalidUrl { .. })), "{bad}");
        }
    }
}
