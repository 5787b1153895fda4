//! Rest-hook Subscriptions (FHIR R4), as pure logic: what a Subscription may say, which changes
//! notify it, and what the notifier sends, when it retries and which status it writes.
//!
//! - [`subscription`]: a Subscription resource validated into an [`ActiveSubscription`] — criteria
//!   parsed by the search parser, the rest-hook channel, `end`, `status`; every problem an
//!   OperationOutcome issue with its FHIRPath expression. The per-tenant limit.
//! - [`endpoint`]: the [`EndpointPolicy`] every endpoint URL (and every address it resolves to)
//!   passes, so a tenant cannot make the server call internal services.
//! - [`matcher`]: the [`Matcher`] holding subscriptions per tenant and resource type, answering
//!   which ones a [`fhirmesh_core::ResourceChanged`] notifies — with the search evaluator, so
//!   matching and search agree.
//! - [`write_rules`]: [`SubscriptionWriteRules`], the resource service's write rules for
//!   Subscriptions (validation on every write, the per-tenant limit).
//! - [`delivery`]: the HTTP request of a notification ([`delivery::plan`]), its signature, the
//!   [`RetryPolicy`] and the [`HealthTracker`] that moves a subscription to `error` and back.
//!
//! What it is not: no HTTP client, no bus, no clock, no randomness beyond the injectable retry
//! jitter, no async. The notifier service does the I/O around it: consumes changes, resolves
//! and pins endpoint addresses, sends, queues retries, writes statuses.
//! `design.md` records the choices (deletes, criteria limits, header names, signature format).

pub mod delivery;
pub mod endpoint;
pub mod matcher;
pub mod metrics;
pub mod runner;
pub mod subscription;
pub mod write_rules;

pub use delivery::{AttemptOutcome, HealthTracker, Method, Notification, RetryPolicy};
pub use endpoint::{Endpoint, EndpointPolicy, EndpointRefused};
pub use matcher::{MatchError, Matcher, Upserted};
pub use metrics::NotifierMetrics;
pub use subscription::{
    ActiveSubscription, Criteria, SubscriptionId, SubscriptionSpec, SubscriptionStatus, Transition, check_tenant_limit,
};
pub use write_rules::SubscriptionWriteRules;

pub(crate) use fhirmesh_fhir::outcome::clip;
