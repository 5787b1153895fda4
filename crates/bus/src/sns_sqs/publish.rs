//! Publishing: `PublishBatch` to the topic, up to 10 events (and 256 KiB) per call, batches one
//! after another so the order given is kept as far as a standard topic keeps any order.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use fhirmesh_core::ResourceChanged;
use fhirmesh_core::ports::{BusError, EventPublisher};

use super::{SnsSqsBus, attributes, unavailable};

/// SNS accepts at most 10 entries per `PublishBatch`.
pub(super) const MAX_BATCH_ENTRIES: usize = 10;
/// SNS limit on one message and on a whole batch: body plus attribute names, types and values.
pub(super) const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// The first retry waits about this long; each further one twice as long, up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The SNS data type of every attribute sent.
const STRING: &str = "String";

/// One event, encoded for SNS.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    /// Base64 of the protobuf encoding.
    pub(super) message: String,
    pub(super) attributes: Vec<(&'static str, String)>,
    /// What SNS counts against its size limit.
    pub(super) size: usize,
    pub(super) idempotency_key: String,
}

impl Outgoing {
    /// The event as SNS will carry it: without its body when the whole would exceed SNS's
    /// message limit (consumers then read the version from the store).
    pub(super) fn new(event: &ResourceChanged) -> Outgoing {
        let outgoing = Outgoing::encode(event);
        if outgoing.size > MAX_PAYLOAD_BYTES && event.resource.is_some() {
            tracing::debug!(key = %event.idempotency_key, size = outgoing.size, "event body too large for SNS; sent without it");
            return Outgoing::encode(&event.without_body());
        }
        outgoing
    }

    fn encode(event: &ResourceChanged) -> Outgoing {
        let message = BASE64.encode(fhirmesh_proto::encode_resource_changed(event));
        let mut attributes = vec![
            (attributes::IDEMPOTENCY_KEY, event.idempotency_key.clone()),
            (attributes::TENANT, event.tenant.as_str().to_owned()),
            (attributes::RESOURCE_TYPE, event.resource_type.as_str().to_owned()),
        ];
        if let Some(traceparent) = &event.traceparent {
            attributes.push((attributes::TRACEPARENT, traceparent.clone()));
        }
        // SNS rejects an empty String attribute value.
        attributes.retain(|(_, value)| !value.is_empty());
        let size = message.len()
            + attributes.iter().map(|(name, value)| name.len() + STRING.len() + value.len()).sum::<usize>();
        Outgoing { message, attributes, size, idempotency_key: event.idempotency_key.clone() }
    }

    fn entry(&self, id: usize) -> Result<PublishBatchRequestEntry, BusError> {
        let mut entry = PublishBatchRequestEntry::builder().id(id.to_string()).message(&self.message);
        for (name, value) in &self.attributes {
            let value =
                MessageAttributeValue::builder().data_type(STRING).string_value(value).build().map_err(|err| {
                    unavailable(format!("building sns attribute '{name}' of event {}: {err}", self.idempotency_key))
                })?;
            entry = entry.message_attributes(*name, value);
        }
        entry.build().map_err(|err| {
            unavailable(format!("building the sns batch entry of event {}: {err}", self.idempotency_key))
        })
    }
}

/// Splits consecutive messages of these sizes into batches of at most [`MAX_BATCH_ENTRIES`]
/// entries and [`MAX_PAYLOAD_BYTES`] in all, keeping their order. A message over the limit on its
/// own gets a batch of its own (and is refused before it is sent).
pub(super) fn batch_ranges(sizes: &[usize]) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    for (index, &size) in sizes.iter().enumerate() {
        let full = index - start == MAX_BATCH_ENTRIES || bytes.saturating_add(size) > MAX_PAYLOAD_BYTES;
        if index > start && full {
            ranges.push(start..index);
            start = index;
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
    }
    if start < sizes.len() {
        ranges.push(start..sizes.len());
    }
    ranges
}

/// The pause before retry number `retry` (1-based): exponential, capped, with jitter (between half
/// and all of it) so that publishers failing together do not retry together.
pub(super) fn backoff(retry: u32) -> Duration {
    let exponential = BASE_BACKOFF.saturating_mul(1u32 << retry.saturating_sub(1).min(16));
    let ceiling = exponential.min(MAX_BACKOFF);
    let half = ceiling / 2;
    half + half.mul_f64(fastrand::f64())
}

impl SnsSqsBus {
    /// Publishes one batch, retrying the entries that failed (and whole calls that failed) with
    /// back-off, at most `publish_attempts` times in all.
    async fn publish_batch(&self, topic_arn: &str, batch: &[Outgoing]) -> Result<(), BusError> {
        let attempts = self.inner.config.publish_attempts.max(1);
        let mut pending: Vec<usize> = (0..batch.len()).collect();
        let mut last_error = String::new();
        for attempt in 1..=attempts {
            if attempt > 1 {
                tokio::time::sleep(backoff(attempt - 1)).await;
            }
            let entries = pending.iter().map(|&id| batch[id].entry(id)).collect::<Result<Vec<_>, _>>()?;
            let result = self
                .inner
                .sns
                .publish_batch()
                .topic_arn(topic_arn)
                .set_publish_batch_request_entries(Some(entries))
                .send()
                .await;
            let output = match result {
                Ok(output) => output,
                Err(err) => {
                    last_error = aws_sdk_sns::error::DisplayErrorContext(err).to_string();
                    tracing::warn!(topic = %topic_arn, attempt, error = %last_error, "sns publish batch failed");
                    continue;
                }
            };
            // A sender fault (a malformed or oversized entry) fails again however often it is sent.
            if let Some(fault) = output.failed().iter().find(|failed| failed.sender_fault()) {
                let key =
                    fault.id().parse::<usize>().ok().and_then(|id| batch.get(id)).map(|o| o.idempotency_key.as_str());
                return Err(unavailable(format!(
                    "sns topic {topic_arn} refused event {}: {} {}",
                    key.unwrap_or("(unknown entry)"),
                    fault.code(),
                    fault.message().unwrap_or_default()
                )));
            }
            // Whatever SNS did not report as published is sent again.
            let published: Vec<usize> = output.successful().iter().filter_map(|ok| ok.id()?.parse().ok()).collect();
            pending.retain(|id| !published.contains(id));
            if pending.is_empty() {
                return Ok(());
            }
            last_error = output
                .failed()
                .iter()
                .map(|failed| format!("{} {}", failed.code(), failed.message().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(topic = %topic_arn, attempt, failed = pending.len(), error = %last_error, "sns publish batch partly failed");
        }
        Err(unavailable(format!(
            "publishing {} of {} events to sns topic {topic_arn} failed after {attempts} attempts: {last_error}",
            pending.len(),
            batch.len()
        )))
    }
}

#[async_trait]
impl EventPublisher for SnsSqsBus {
    /// Publishes in batches of up to 10 (and 256 KiB), one batch after another; returns once SNS
    /// accepted every event. An event over the SNS size limit fails the publish, naming it.
    async fn publish(&self, events: &[ResourceChanged]) -> Result<(), BusError> {
        if events.is_empty() {
            return Ok(());
        }
        let topic_arn = self.topic_arn().await?;
        let outgoing: Vec<Outgoing> = events.iter().map(Outgoing::new).collect();
        if let Some(big) = outgoing.iter().find(|o| o.size > MAX_PAYLOAD_BYTES) {
            return Err(unavailable(format!(
                "event {} is {} bytes encoded for sns, over its limit of {MAX_PAYLOAD_BYTES} bytes",
                big.idempotency_key, big.size
            )));
        }
        let sizes: Vec<usize> = outgoing.iter().map(|o| o.size).collect();
        for range in batch_ranges(&sizes) {
            self.publish_batch(&topic_arn, &outgoing[range]).await?;
        }
        tracing::debug!(topic = %topic_arn, events = events.len(), "events published to sns");
        Ok(())
    }
}
