//! The notifier's metrics, named `fhirmesh_notifier_*` and rendered in the OpenMetrics text
//! format by whichever HTTP server exposes them (the gateway's `/metrics` in `fhirmesh serve`,
//! the notifier's own in the mesh). Declared here and nowhere else.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `fhirmesh_notifier_delivery_latency_seconds` | histogram | commit of the change → 2xx from the receiver, per delivered notification (retries included) |
//! | `fhirmesh_notifier_attempts_total{result}` | counter | delivery attempts, `result` = `success` or `failure` |
//! | `fhirmesh_notifier_notifications_total{outcome}` | counter | notifications finished: `delivered`, `dead_lettered` (after the last attempt), `overflowed` (dead-lettered at once: the subscription's queue was full) |
//! | `fhirmesh_notifier_queued_notifications` | gauge | notifications waiting or in delivery in this process |
//! | `fhirmesh_notifier_subscriptions` | gauge | subscriptions held for matching in this process |
//! | `fhirmesh_notifier_ready` | gauge | 1 while the last read of changes succeeded |

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

/// Buckets of the end-to-end latency, in seconds: 5 ms to 10 minutes (retries).
const LATENCY_BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// How a notification ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Delivered,
    DeadLettered,
    Overflowed,
}

impl Finished {
    fn label(self) -> &'static str {
        match self {
            Finished::Delivered => "delivered",
            Finished::DeadLettered => "dead_lettered",
            Finished::Overflowed => "overflowed",
        }
    }
}

/// The notifier's metrics (cheap to clone: every handle shares the same values).
#[derive(Clone)]
pub struct NotifierMetrics {
    registry: Arc<Registry>,
    latency: Histogram,
    attempts: Family<Labels, Counter>,
    notifications: Family<Labels, Counter>,
    queued: Gauge,
    subscriptions: Gauge,
    ready: Gauge,
}

impl std::fmt::Debug for NotifierMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifierMetrics").finish_non_exhaustive()
    }
}

impl Default for NotifierMetrics {
    fn default() -> Self {
        NotifierMetrics::new()
    }
}

impl NotifierMetrics {
    pub fn new() -> NotifierMetrics {
        let latency = Histogram::new(LATENCY_BUCKETS);
        let attempts = Family::<Labels, Counter>::default();
        let notifications = Family::<Labels, Counter>::default();
        let queued = Gauge::default();
        let subscriptions = Gauge::default();
        let ready = Gauge::default();
        let mut registry = Registry::with_prefix("fhirmesh_notifier");
        registry.register(
            "delivery_latency_seconds",
            "Commit of a change to a 2xx answer from the receiver, per delivered notification, retries included.",
            latency.clone(),
        );
        registry.register("attempts", "Rest-hook delivery attempts, by result.", attempts.clone());
        registry.register(
            "notifications",
            "Notifications finished, by outcome (delivered, dead_lettered, overflowed).",
            notifications.clone(),
        );
        registry.register(
            "queued_notifications",
            "Notifications waiting or in delivery in this process.",
            queued.clone(),
        );
        registry.register("subscriptions", "Subscriptions held for matching in this process.", subscriptions.clone());
        registry.register("ready", "1 while the notifier's last read of changes succeeded.", ready.clone());
        NotifierMetrics { registry: Arc::new(registry), latency, attempts, notifications, queued, subscriptions, ready }
    }

    /// Appends the metrics in the OpenMetrics text format, without the final `# EOF`.
    pub fn render(&self, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(out, &self.registry);
    }

    pub(crate) fn attempt(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.attempts.get_or_create(&[("result", result)]).inc();
    }

    pub(crate) fn finished(&self, how: Finished, since_commit: Option<Duration>) {
        self.notifications.get_or_create(&[("outcome", how.label())]).inc();
        if let (Finished::Delivered, Some(latency)) = (how, since_commit) {
            self.latency.observe(latency.as_secs_f64());
        }
    }

    pub(crate) fn queued(&self, delta: i64) {
        self.queued.inc_by(delta);
    }

    pub(crate) fn set_subscriptions(&self, held: usize) {
        self.subscriptions.set(i64::try_from(held).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Whether the last read of changes succeeded (the notifier's readiness).
    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_metrics_carry_their_names_labels_and_values() {
        let metrics = NotifierMetrics::new();
        metrics.attempt(true);
        metrics.attempt(false);
        metrics.attempt(false);
        metrics.finished(Finished::Delivered, Some(Duration::from_millis(30)));
        metrics.finished(Finished::Overflowed, None);
        metrics.queued(3);
        metrics.queued(-1);
        metrics.set_subscriptions(7);
        metrics.set_ready(true);
        let mut out = String::new();
        metrics.render(&mut out);
        for line in [
            "fhirmesh_notifier_attempts_total{result=\"success\"} 1",
            "fhirmesh_notifier_attempts_total{result=\"failure\"} 2",
            "fhirmesh_notifier_notifications_total{outcome=\"delivered\"} 1",
            "fhirmesh_notifier_notifications_total{outcome=\"overflowed\"} 1",
            "fhirmesh_notifier_delivery_latency_seconds_count 1",
            "fhirmesh_notifier_delivery_latency_seconds_bucket{le=\"0.05\"} 1",
            "fhirmesh_notifier_delivery_latency_seconds_bucket{le=\"0.025\"} 0",
            "fhirmesh_notifier_queued_notifications 2",
            "fhirmesh_notifier_subscriptions 7",
            "fhirmesh_notifier_ready 1",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in:\n{out}");
        }
        assert!(!out.contains("# EOF"), "the caller ends the exposition");
        assert!(metrics.is_ready());
    }
}
