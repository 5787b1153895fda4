//! Bearer-token authentication for fhirmesh: verifies JWT access tokens against the signing keys an
//! identity provider publishes as a JWKS (a file, or an HTTPS URL cached and refreshed on key rotation).
//!
//! What it is: [`Verifier::verify`] turns a compact JWS string into verified [`Claims`] or a precise
//! [`AuthError`]. Signatures are checked by the `jsonwebtoken` crate (RustCrypto backend); this crate
//! chooses the key (by `kid`, and only a key whose type fits the token's `alg`), and checks the
//! registered claims (`exp`, `nbf`, `iat`, `iss`, `aud`, `sub`) itself so that each failure has its
//! own error variant.
//!
//! What it is not: an OAuth client, a token issuer, or an authorization policy. Mapping claims to
//! tenants, scopes or FHIR compartments, and mapping [`AuthError`] to an HTTP response, belong to the
//! gateway. Shared-secret (HS*) tokens are refused by design: a JWKS publishes public keys only.
//!
//! Key caching and refetch semantics are described in `design.md` beside this crate's manifest.

mod claims;
mod config;
mod error;
mod jwks;
mod keystore;
mod verifier;

pub use claims::Claims;
pub use config::{ConfigError, DEFAULT_LEEWAY, DEFAULT_MIN_REFETCH, DEFAULT_REFRESH, JwksSource, JwtConfig};
pub use error::AuthError;
pub use jsonwebtoken::Algorithm;
pub use verifier::{MAX_TOKEN_BYTES, Verifier};
