//! Why a bearer token was refused.

/// Why a bearer token was refused.
///
/// Every variant but [`AuthError::KeysUnavailable`] means the token is invalid (HTTP 401 with
/// `WWW-Authenticate: Bearer error="invalid_token"`); `KeysUnavailable` means the server could not
/// obtain any signing key, a server-side failure (HTTP 503): see [`AuthError::is_token_error`].
///
/// The `String` payloads are for logs: text chosen by this crate, plus at most a short, escaped
/// excerpt of the token's `alg` or `kid`. [`AuthError::description`] never includes token contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a compact JWS (three base64url parts), a header or payload that is not a JSON object, a
    /// registered claim of the wrong JSON type, or a token over [`crate::MAX_TOKEN_BYTES`].
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `alg` is `none`, unknown, not in the allowed list, or does not fit the selected key's type.
    #[error("unsupported signing algorithm: {0}")]
    UnsupportedAlgorithm(String),
    /// No key in the JWKS has the token's `kid` (after a rate-limited refetch), or the token has no
    /// `kid` and the JWKS does not have exactly one key usable for its `alg`.
    #[error("no verification key for the token: {0}")]
    UnknownKey(String),
    /// The signature does not verify with the selected key.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` is in the past, beyond the leeway.
    #[error("token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future, beyond the leeway.
    #[error("token is not yet valid")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// `aud` has none of the configured audiences.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// A required claim (`exp`, `iss`, `aud`, `sub`) is absent.
    #[error("token lacks the required claim {0}")]
    MissingClaim(&'static str),
    /// No signing key is known: the JWKS could not be fetched, or it has no usable key.
    #[error("token verification keys are unavailable: {0}")]
    KeysUnavailable(String),
}

impl AuthError {
    /// A short, safe description for the `WWW-Authenticate: Bearer error="invalid_token",
    /// error_description="…"` header and the OperationOutcome: printable ASCII without `"` or `\`,
    /// and no token contents.
    pub fn description(&self) -> String {
        match self {
            Self::Malformed(detail) => format!("malformed token: {}", header_safe(detail)),
            Self::UnsupportedAlgorithm(_) => "the token's signing algorithm is not accepted".into(),
            Self::UnknownKey(_) => "the token's signing key is not known".into(),
            Self::KeysUnavailable(_) => "token signing keys are temporarily unavailable".into(),
            Self::BadSignature
            | Self::Expired
            | Self::NotYetValid
            | Self::WrongIssuer
            | Self::WrongAudience
            | Self::MissingClaim(_) => self.to_string(),
        }
    }

    /// `true` when the token itself is at fault (401 `invalid_token`); `false` for
    /// [`AuthError::KeysUnavailable`], a server-side failure (503).
    pub fn is_token_error(&self) -> bool {
        !matches!(self, Self::KeysUnavailable(_))
    }
}

/// Keeps printable ASCII other than `"` and `\`, so the text can sit in a quoted header parameter.
fn header_safe(text: &str) -> String {
    text.chars().filter(|c| (' '..='~').contains(c) && *c != '"' && *c != '\\').collect()
}

/// A short, escaped excerpt of an attacker-controlled header value, for error payloads and logs.
pub(crate) fn excerpt(value: &str) -> String {
    const MAX_CHARS: usize = 40;
    let mut out: String = value.chars().take(MAX_CHARS).flat_map(char::escape_default).collect();
    if value.chars().count() > MAX_CHARS {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_are_header_safe_and_carry_no_token_contents() {
        let all = [
            AuthError::Malformed("bad \"quoted\" \\ detail\n".into()),
            AuthError::UnsupportedAlgorithm("evil\"alg".into()),
            AuthError::UnknownKey("kid \"secret-kid\"".into()),
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::WrongIssuer,
            AuthError::WrongAudience,
            AuthError::MissingClaim("sub"),
            AuthError::KeysUnavailable("http://internal:8080 refused".into()),
        ];
        for e in &all {
            let d = e.description();
            assert!(!d.is_empty());
            assert!(d.chars().all(|c| (' '..='~').contains(&c) && c != '"' && c != '\\'), "{d}");
            assert!(!d.contains("evil") && !d.contains("secret-kid") && !d.contains("internal"), "{d}");
        }
        assert_eq!(AuthError::MissingClaim("exp").description(), "token lacks the required claim exp");
        assert!(!AuthError::KeysUnavailable(String::new()).is_token_error());
        assert!(AuthError::Expired.is_token_error());
    }

    #[test]
    fn excerpts_are_short_and_escaped() {
        assert_eq!(excerpt("k1"), "k1");
        assert_eq!(excerpt("a\"b\n"), "a\\\"b\\n");
        assert_eq!(excerpt(&"x".repeat(1000)), format!("{}...", "x".repeat(40)));
    }
}
