//! Delivery, as pure decisions: the HTTP request a notification is ([`plan`]), its signature
//! ([`sign`], [`verify_signature`]), when to retry ([`RetryPolicy`]) and which status to write
//! after an attempt ([`HealthTracker`]). The notifier service does the I/O.
//!
//! The request follows the R4 rest-hook channel (hl7.org/fhir/R4/subscription.html): without a
//! payload, a `POST` with no body to the endpoint; with a payload, the endpoint is a FHIR base and
//! the resource is sent as an update, `PUT [endpoint]/[type]/[id]`, in the payload's MIME type.
//! `channel.header` entries are sent as headers. A delete (see [`crate::matcher`]) is a `POST`
//! without body, or with a payload `DELETE [endpoint]/[type]/[id]` — the mirror of the update.
//!
//! Every request also carries, whatever the payload:
//! - [`EVENT_ID_HEADER`] `{tenant}/{type}/{id}/_history/{versionId}`: the same for every attempt
//!   and redelivery of one change — receivers de-duplicate on it (with [`SUBSCRIPTION_HEADER`]
//!   when several subscriptions share an endpoint);
//! - [`SUBSCRIPTION_HEADER`] `Subscription/{id}`;
//! - [`TIMESTAMP_HEADER`]: Unix seconds when the attempt was planned (plan again per attempt);
//! - [`SIGNATURE_HEADER`] `v1=<hex>` when the subscription has a signing secret:
//!   HMAC-SHA256 with the secret as key over `{timestamp}.{event id}.{body}` (the header values as
//!   sent, the raw body bytes; an empty body for no body). A receiver recomputes it, compares in
//!   constant time and refuses timestamps outside its tolerance (replays) — [`verify_signature`].

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use fhirmesh_core::ResourceChanged;
use fhirmesh_core::model::{Operation, TenantId};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use time::OffsetDateTime;

use crate::subscription::{ActiveSubscription, SigningSecret, SubscriptionId, SubscriptionStatus, Transition};

/// Stable id of the change a notification is about.
pub const EVENT_ID_HEADER: &str = "X-Fhirmesh-Event-Id";
/// The notifying subscription, `Subscription/{id}`.
pub const SUBSCRIPTION_HEADER: &str = "X-Fhirmesh-Subscription";
/// Unix seconds at which the attempt was signed.
pub const TIMESTAMP_HEADER: &str = "X-Fhirmesh-Timestamp";
/// `v1=<lowercase hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "X-Fhirmesh-Signature";

/// The HTTP method of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One HTTP request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub method: Method,
    /// Absolute URL, normalized; check it (and resolved addresses) against the endpoint policy.
    pub url: String,
    /// In order: the subscription's `channel.header` entries, then the notifier's own headers
    /// (`Content-Type` when there is a body).
    pub headers: Vec<(String, String)>,
    pub body: Option<Bytes>,
}

impl Notification {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Why a notification cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// The subscription and the change belong to different tenants (never deliver across them).
    TenantMismatch { subscription: TenantId, change: TenantId },
    /// A payload subscription and a live version without its body: read it from the store.
    BodyRequired,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::TenantMismatch { subscription, change } => {
                write!(f, "subscription of tenant {subscription} cannot be notified of a change of tenant {change}")
            }
            PlanError::BodyRequired => f.write_str("the subscription has a payload and the resource body is missing"),
        }
    }
}

impl std::error::Error for PlanError {}

/// The request notifying `subscription` of `change` at `now`. `body` is the changed version's
/// JSON, needed for a create or update when the subscription has a payload (`change.resource`, or
/// the version read from the store when the event omitted it); it is ignored otherwise.
pub fn plan(
    subscription: &ActiveSubscription,
    change: &ResourceChanged,
    body: Option<Bytes>,
    now: OffsetDateTime,
) -> Result<Notification, PlanError> {
    if subscription.tenant() != &change.tenant {
        return Err(PlanError::TenantMismatch {
            subscription: subscription.tenant().clone(),
            change: change.tenant.clone(),
        });
    }
    let channel = subscription.channel();
    let endpoint = channel.endpoint();
    let mut headers: Vec<(String, String)> = channel.headers().to_vec();
    let (method, url, body) = match (channel.payload(), change.operation) {
        (None, _) => (Method::Post, endpoint.as_str().to_owned(), None),
        (Some(payload), Operation::Create | Operation::Update) => {
            let body = body.ok_or(PlanError::BodyRequired)?;
            headers.push(("Content-Type".to_owned(), payload.content_type().to_owned()));
            (Method::Put, resource_url(endpoint.url(), change), Some(body))
        }
        (Some(_), Operation::Delete) => (Method::Delete, resource_url(endpoint.url(), change), None),
    };
    let event_id =
        ResourceChanged::idempotency_key_for(&change.tenant, change.resource_type, &change.id, change.version_id);
    let timestamp = now.unix_timestamp();
    headers.push((EVENT_ID_HEADER.to_owned(), event_id.clone()));
    headers.push((SUBSCRIPTION_HEADER.to_owned(), format!("Subscription/{}", subscription.id())));
    headers.push((TIMESTAMP_HEADER.to_owned(), timestamp.to_string()));
    if let Some(secret) = channel.signing_secret() {
        let signature = sign(secret, timestamp, &event_id, body.as_deref().unwrap_or_default());
        headers.push((SIGNATURE_HEADER.to_owned(), signature));
    }
    Ok(Notification { method, url, headers, body })
}

/// `[endpoint]/[type]/[id]`, keeping the endpoint's query.
fn resource_url(endpoint: &url::Url, change: &ResourceChanged) -> String {
    let mut url = endpoint.clone();
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.pop_if_empty().push(change.resource_type.as_str()).push(change.id.as_str());
    }
    url.into()
}

/// The [`SIGNATURE_HEADER`] value: `v1=` and the lowercase hex HMAC-SHA256, keyed with the
/// secret, of `{timestamp}.{event_id}.{body}`.
pub fn sign(secret: &SigningSecret, timestamp: i64, event_id: &str, body: &[u8]) -> String {
    let tag = mac(secret.expose(), timestamp, event_id, body).finalize().into_bytes();
    let mut out = String::with_capacity(3 + tag.len() * 2);
    out.push_str("v1=");
    for byte in tag.iter() {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn mac(secret: &[u8], timestamp: i64, event_id: &str, body: &[u8]) -> Hmac<Sha256> {
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(secret) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(event_id.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Why a signature does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// The timestamp header is not an integer.
    MalformedTimestamp,
    /// The timestamp is further than the tolerance from now (a replay, or a skewed clock).
    OutsideTolerance,
    /// No `v1=` value matches.
    Mismatch,
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignatureError::MalformedTimestamp => "the timestamp is not a number of seconds",
            SignatureError::OutsideTolerance => "the timestamp is outside the tolerance",
            SignatureError::Mismatch => "the signature does not match",
        })
    }
}

impl std::error::Error for SignatureError {}

/// What a receiver does with a signed notification (and what tests use): checks the timestamp
/// header is within `tolerance` of `now`, then that one of the signature header's
/// comma-separated `v1=` values is the HMAC of `{timestamp}.{event_id}.{body}` (constant-time).
pub fn verify_signature(
    secret: &[u8],
    timestamp_header: &str,
    event_id: &str,
    body: &[u8],
    signature_header: &str,
    now: OffsetDateTime,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let timestamp: i64 = timestamp_header.trim().parse().map_err(|_| SignatureError::MalformedTimestamp)?;
    let skew = now.unix_timestamp().abs_diff(timestamp);
    if skew > tolerance.as_secs() {
        return Err(SignatureError::OutsideTolerance);
    }
    let verified = signature_header
        .split(',')
        .filter_map(|part| part.trim().strip_prefix("v1="))
        .filter_map(decode_hex)
        .any(|tag| mac(secret, timestamp, event_id, body).verify_slice(&tag).is_ok());
    if verified { Ok(()) } else { Err(SignatureError::Mismatch) }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |b: u8| HEX.iter().position(|h| *h == b.to_ascii_lowercase()).and_then(|p| u8::try_from(p).ok());
    text.as_bytes().chunks(2).map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?)).collect()
}

/// The outcome of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Anything else: a non-2xx status (redirects included — they are not followed), a timeout,
    /// a refused connection or address. `reason` is short and becomes `Subscription.error`.
    Failed { reason: String },
}

impl AttemptOutcome {
    /// The outcome of an HTTP response status.
    pub fn from_status(status: u16) -> AttemptOutcome {
        if (200..300).contains(&status) {
            AttemptOutcome::Delivered
        } else {
            AttemptOutcome::Failed { reason: format!("the endpoint answered HTTP {status}") }
        }
    }
}

/// When to try a failed notification again: exponential backoff with full jitter (a uniformly
/// random delay between zero and the exponential cap), so a recovering receiver is not hit by
/// every queued notification at once.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// The cap after the first failure; doubled after each further failure.
    pub base: Duration,
    /// The largest cap.
    pub max_delay: Duration,
    /// Attempts in all, the first included; after that many failures the notification is
    /// dead-lettered.
    pub max_attempts: u32,
    /// Source of the jitter factor in `[0, 1)` (values outside are clamped).
    pub jitter: fn() -> f64,
}

impl Default for RetryPolicy {
    /// 1 s doubling up to 5 min, 10 attempts (about 10 minutes of retries at worst).
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            max_attempts: 10,
            jitter: fastrand::f64,
        }
    }
}

impl RetryPolicy {
    pub fn new(base: Duration, max_delay: Duration, max_attempts: u32) -> RetryPolicy {
        RetryPolicy { base, max_delay, max_attempts, jitter: fastrand::f64 }
    }

    /// The same policy with another jitter source (tests: a constant).
    pub fn with_jitter(self, jitter: fn() -> f64) -> RetryPolicy {
        RetryPolicy { jitter, ..self }
    }

    /// The upper bound of the delay after `failed_attempts` failures: `min(max_delay, base ·
    /// 2^(failed_attempts − 1))`.
    pub fn cap(&self, failed_attempts: u32) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(63);
        let factor = 1u64 << exponent;
        let millis = u64::try_from(self.base.as_millis()).unwrap_or(u64::MAX).saturating_mul(factor);
        Duration::from_millis(millis).min(self.max_delay)
    }

    /// The delay before the next attempt, after `failed_attempts` failed ones (0: the first
    /// attempt, no delay); `None` when no attempt is left (dead-letter the notification).
    pub fn next_delay(&self, failed_attempts: u32) -> Option<Duration> {
        if failed_attempts >= self.max_attempts {
            return None;
        }
        if failed_attempts == 0 {
            return Some(Duration::ZERO);
        }
        let factor = (self.jitter)();
        let factor = if factor.is_finite() { factor.clamp(0.0, 1.0) } else { 0.0 };
        Some(self.cap(failed_attempts).mul_f64(factor))
    }

    /// As [`RetryPolicy::next_delay`], but never sooner than a receiver's `Retry-After` (capped at
    /// `max_delay`).
    pub fn next_delay_after(&self, failed_attempts: u32, retry_after: Option<Duration>) -> Option<Duration> {
        let delay = self.next_delay(failed_attempts)?;
        Some(retry_after.map_or(delay, |hint| delay.max(hint.min(self.max_delay))))
    }
}

/// Consecutive failures per subscription, and the status transitions they cause: after
/// `failure_threshold` consecutive failed attempts, `error` with the last failure as
/// `Subscription.error`; on the next success, `active` again. Each transition is returned once
/// (the service writes it); further failures in `error` return nothing.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    failure_threshold: u32,
    subscriptions: std::collections::HashMap<(TenantId, SubscriptionId), Health>,
}

#[derive(Debug, Clone, Copy)]
struct Health {
    consecutive_failures: u32,
    /// The status last written or loaded.
    status: SubscriptionStatus,
    version_id: u64,
}

/// The longest `Subscription.error` text written.
const MAX_ERROR_CHARS: usize = 500;

impl HealthTracker {
    /// `failure_threshold` consecutive failed attempts put a subscription in `error` (0 counts as 1).
    pub fn new(failure_threshold: u32) -> HealthTracker {
        HealthTracker { failure_threshold: failure_threshold.max(1), subscriptions: Default::default() }
    }

    /// Loads (or reloads) a subscription's stored status. A new version — the subscriber's
    /// update, or the service's own status write — starts the failure count again.
    pub fn track(&mut self, subscription: &ActiveSubscription) {
        let key = (subscription.tenant().clone(), subscription.id().clone());
        let status = subscription.status();
        let version_id = subscription.version_id();
        let health = self.subscriptions.entry(key).or_insert(Health { consecutive_failures: 0, status, version_id });
        if health.version_id != version_id {
            health.consecutive_failures = 0;
        }
        health.status = status;
        health.version_id = version_id;
    }

    /// Stops tracking a subscription (removed or `off`).
    pub fn forget(&mut self, tenant: &TenantId, id: &SubscriptionId) {
        self.subscriptions.remove(&(tenant.clone(), id.clone()));
    }

    /// Records an attempt's outcome; returns the status the service must write, if any. An
    /// untracked subscription is taken as `active`.
    pub fn record(&mut self, tenant: &TenantId, id: &SubscriptionId, outcome: &AttemptOutcome) -> Option<Transition> {
        let health = self.subscriptions.entry((tenant.clone(), id.clone())).or_insert(Health {
            consecutive_failures: 0,
            status: SubscriptionStatus::Active,
            version_id: 0,
        });
        match outcome {
            AttemptOutcome::Delivered => {
                health.consecutive_failures = 0;
                if matches!(health.status, SubscriptionStatus::Error | SubscriptionStatus::Requested) {
                    health.status = SubscriptionStatus::Active;
                    return Some(Transition::ToActive);
                }
                None
            }
            AttemptOutcome::Failed { reason } => {
                health.consecutive_failures = health.consecutive_failures.saturating_add(1);
                if health.consecutive_failures < self.failure_threshold || health.status == SubscriptionStatus::Error {
                    return None;
                }
                health.status = SubscriptionStatus::Error;
                let mut text =
                    format!("{} consecutive delivery attempts failed; last: {reason}", health.consecutive_failures);
                if text.chars().count() > MAX_ERROR_CHARS {
                    text = text.chars().take(MAX_ERROR_CHARS).collect();
                    text.push('…');
                }
                Some(Transition::ToError { reason: text })
            }
        }
    }

    /// Whether a subscription is in `error` (its endpoint keeps failing): the notifier then keeps
    /// one notification as the probe and dead-letters the others without attempting them.
    pub fn is_failing(&self, tenant: &TenantId, id: &SubscriptionId) -> bool {
        self.subscriptions.get(&(tenant.clone(), id.clone())).is_some_and(|h| h.status == SubscriptionStatus::Error)
    }

    /// The current run of failed attempts of a subscription.
    pub fn consecutive_failures(&self, tenant: &TenantId, id: &SubscriptionId) -> u32 {
        self.subscriptions.get(&(tenant.clone(), id.clone())).map_or(0, |h| h.consecutive_failures)
    }
}

#[cfg(test)]
mod tests;
