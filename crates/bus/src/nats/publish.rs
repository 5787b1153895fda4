//! Pipelined JetStream publishing with bounded retries, shared by the event publisher and the
//! dead-letter path, and the back-off both use.

use std::hash::BuildHasher;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use fhirmesh_core::ports::BusError;

/// Messages sent before their acknowledgements are awaited. Bounded so a huge batch never holds
/// all of the context's in-flight permits at once (that would wait on itself).
const PUBLISH_WINDOW: usize = 256;
/// The first retry delay; it doubles on every further attempt, up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// One message to publish.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// `base · 2^(attempt-1)`, at most `cap` (attempt 1 waits `base`).
pub(crate) fn exponential(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
    base.saturating_mul(factor).min(cap)
}

/// A uniform value in `[0, 1)`, from the standard library's per-instance random hash keys (good
/// enough to spread retries; not for anything secret).
fn unit_random() -> f64 {
    let bits = std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The exponential delay with "equal jitter": between half of it and all of it, so retrying
/// publishers do not move in lock-step.
pub(crate) fn backoff_with_jitter(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = exponential(attempt, base, cap);
    let half = ceiling / 2;
    let jitter = Duration::from_nanos((half.as_nanos() as f64 * unit_random()) as u64);
    half.saturating_add(jitter)
}

/// Failures that go away on their own: the server did not answer in time, the connection is
/// being re-established, or no stream is listening while the server restarts.
pub(crate) fn is_transient(kind: &PublishErrorKind) -> bool {
    matches!(
        kind,
        PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::StreamNotFound
            | PublishErrorKind::MaxAckPending
    )
}

/// Publishes `messages` in order and returns once the stream acknowledged every one. Messages are
/// sent in windows whose acknowledgements are awaited together. After a transient failure the
/// publish resumes from the first unacknowledged message (the stream drops the ones it already
/// stored by their `Nats-Msg-Id`), at most `attempts` times in all, with jittered back-off.
pub(crate) async fn publish_all(context: &Context, messages: &[Outgoing], attempts: u32) -> Result<(), BusError> {
    let attempts = attempts.max(1);
    let mut done = 0;
    let mut failures = 0;
    while done < messages.len() {
        let end = done.saturating_add(PUBLISH_WINDOW).min(messages.len());
        let Some(window) = messages.get(done..end) else { break };
        match publish_window(context, window).await {
            Ok(()) => done = end,
            Err((acknowledged, error)) => {
                done += acknowledged;
                failures += 1;
                let subject = messages.get(done).map_or("", |m| m.subject.as_str());
                let kind = error.kind();
                if !is_transient(&kind) || failures >= attempts {
                    return Err(BusError::Unavailable(format!(
                        "publishing to '{subject}' failed after {failures} attempt(s): {error} \
                         ({done} of {} messages acknowledged)",
                        messages.len()
                    )));
                }
                let delay = backoff_with_jitter(failures, FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
                tracing::warn!(
                    subject,
                    attempt = failures,
                    delay_ms = delay.as_millis() as u64,
                    error = %error,
                    "nats publish failed; retrying"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
    Ok(())
}

/// Sends every message of the window, then awaits the acknowledgements in order. On failure,
/// returns how many leading messages were acknowledged, and the error.
async fn publish_window(
    context: &Context,
    window: &[Outgoing],
) -> Result<(), (usize, async_nats::jetstream::context::PublishError)> {
    let mut pending = Vec::with_capacity(window.len());
    let mut send_error = None;
    for message in window {
        let publish = PublishMessage::build().payload(message.payload.clone()).headers(message.headers.clone());
        match context.send_publish(message.subject.clone(), publish).await {
            Ok(ack) => pending.push(ack),
            Err(error) => {
                send_error = Some(error);
                break;
            }
        }
    }
    let sent = pending.len();
    for (index, ack) in pending.into_iter().enumerate() {
        match ack.await {
            Ok(ack) if ack.duplicate => {
                tracing::debug!(stream = %ack.stream, sequence = ack.sequence, "duplicate publish ignored by the stream");
            }
            Ok(_) => {}
            Err(error) => return Err((index, error)),
        }
    }
    match send_error {
        Some(error) => Err((sent, error)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_doubles_up_to_the_cap_without_overflowing() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        assert_eq!(exponential(0, base, cap), base);
        assert_eq!(exponential(1, base, cap), base);
        assert_eq!(exponential(2, base, cap), Duration::from_millis(200));
        assert_eq!(exponential(5, base, cap), Duration::from_millis(1600));
        assert_eq!(exponential(6, base, cap), cap);
        assert_eq!(exponential(u32::MAX, base, cap), cap);
        assert_eq!(exponential(u32::MAX, Duration::MAX, Duration::MAX), Duration::MAX);
    }

    #[test]
    fn jittered_backoff_stays_between_half_and_all_of_the_delay() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for attempt in 1..10 {
            let ceiling = exponential(attempt, base, cap);
            for _ in 0..50 {
                let delay = backoff_with_jitter(attempt, base, cap);
                assert!(delay >= ceiling / 2 && delay <= ceiling, "{delay:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
            }
        }
        assert!(backoff_with_jitter(u32::MAX, Duration::MAX, Duration::MAX) <= Duration::MAX);
    }

    #[test]
    fn jitter_varies() {
        let delays: std::collections::HashSet<Duration> =
            (0..20).map(|_| backoff_with_jitter(4, Duration::from_millis(100), Duration::from_secs(2))).collect();
        assert!(delays.len() > 1, "20 jittered delays were all equal: {delays:?}");
    }

    #[test]
    fn only_transient_failures_are_retried() {
        assert!(is_transient(&PublishErrorKind::TimedOut));
        assert!(is_transient(&PublishErrorKind::StreamNotFound));
        assert!(is_transient(&PublishErrorKind::BrokenPipe));
        assert!(!is_transient(&PublishErrorKind::MaxPayloadExceeded));
        assert!(!is_transient(&PublishErrorKind::WrongLastSequence));
        assert!(!is_transient(&PublishErrorKind::Other));
    }
}
