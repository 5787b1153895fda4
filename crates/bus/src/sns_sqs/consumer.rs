//! The durable consumer: long-polls the service's queue, decodes events, settles deliveries with
//! `DeleteMessageBatch` / `ChangeMessageVisibility`, and dead-letters poison messages itself.
//!
//! Acknowledgements are batched by group commit: an `ack` joins the pending ones; whoever holds
//! the flush turn sends everything pending as `DeleteMessageBatch` calls of 10, and each waiting
//! `ack` gets its own entry's result. Acknowledging many deliveries at once (the indexer acks a
//! whole fetch) costs a tenth of the requests; a lone `ack` is one request, as before.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, Message, MessageAttributeValue, MessageSystemAttributeName};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use fhirmesh_core::ResourceChanged;
use fhirmesh_core::ports::{Acknowledge, BusError, Delivery, EventConsumer};
use tokio::sync::{OnceCell, oneshot};

use super::{
    MAX_LONG_POLL, MAX_VISIBILITY_TIMEOUT, QueueUrls, SnsSqsConfig, attributes, unavailable, whole_seconds_ceil,
};

/// SQS returns at most 10 messages per `ReceiveMessage`.
pub(super) const MAX_RECEIVE: usize = 10;
/// SQS allows at most 10 message attributes per message.
const MAX_ATTRIBUTES: usize = 10;
/// How much longer than its long-poll a `ReceiveMessage` may take before the consumer gives up on it.
const RECEIVE_GRACE: Duration = Duration::from_secs(15);
/// `DeleteMessageBatch` takes at most 10 entries.
const MAX_DELETE_BATCH: usize = 10;
/// The longest `dead-letter-reason` attribute value written.
const MAX_REASON_CHARS: usize = 256;
/// SQS refuses an empty body; a poison message without one is dead-lettered with this one.
const EMPTY_BODY: &str = "(empty body)";

/// A durable consumer of one service's queue (see [`super::SnsSqsBus::consumer`]). Cheap to clone;
/// clones share the looked-up queue URLs.
#[derive(Clone)]
pub struct SqsConsumer {
    inner: Arc<ConsumerInner>,
}

struct ConsumerInner {
    sqs: aws_sdk_sqs::Client,
    config: SnsSqsConfig,
    consumer: String,
    queue_url: OnceCell<Arc<str>>,
    dead_letter_url: OnceCell<String>,
    acks: Arc<AckBatcher>,
}

impl std::fmt::Debug for SqsConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsConsumer")
            .field("consumer", &self.inner.consumer)
            .field("queue_url", &self.inner.queue_url.get())
            .finish_non_exhaustive()
    }
}

impl SqsConsumer {
    pub(super) fn new(
        sqs: aws_sdk_sqs::Client,
        config: SnsSqsConfig,
        consumer: &str,
        known: Option<QueueUrls>,
    ) -> SqsConsumer {
        let (queue_url, dead_letter_url) = match known {
            Some(urls) => (OnceCell::new_with(Some(Arc::from(urls.queue))), OnceCell::new_with(Some(urls.dead_letter))),
            None => (OnceCell::new(), OnceCell::new()),
        };
        SqsConsumer {
            inner: Arc::new(ConsumerInner {
                sqs,
                config,
                consumer: consumer.to_owned(),
                queue_url,
                dead_letter_url,
                acks: Arc::default(),
            }),
        }
    }

    /// The consumer service this reads for.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    /// The URL of the queue this consumer reads (looked up by name on first use).
    pub async fn queue_url(&self) -> Result<String, BusError> {
        Ok(self.resolved_queue_url().await?.to_string())
    }

    /// The URL of this consumer's dead-letter queue (looked up by name on first use).
    pub async fn dead_letter_queue_url(&self) -> Result<String, BusError> {
        let inner = &self.inner;
        inner
            .dead_letter_url
            .get_or_try_init(|| self.lookup(inner.config.dead_letter_queue_name(&inner.consumer)))
            .await
            .cloned()
    }

    async fn resolved_queue_url(&self) -> Result<Arc<str>, BusError> {
        let inner = &self.inner;
        inner
            .queue_url
            .get_or_try_init(|| async {
                inner.config.check_consumer(&inner.consumer)?;
                self.lookup(inner.config.queue_name(&inner.consumer)).await.map(Arc::from)
            })
            .await
            .cloned()
    }

    async fn lookup(&self, queue_name: String) -> Result<String, BusError> {
        let out = self.inner.sqs.get_queue_url().queue_name(&queue_name).send().await.map_err(|err| {
            unavailable(format!(
                "looking up sqs queue '{queue_name}' of consumer '{}' (was the bus provisioned?): {}",
                self.inner.consumer,
                aws_sdk_sqs::error::DisplayErrorContext(err)
            ))
        })?;
        out.queue_url()
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| unavailable(format!("looking up sqs queue '{queue_name}': the response has no url")))
    }

    /// One `ReceiveMessage`, bounded in time on the client side too.
    async fn receive(&self, queue_url: &str, max: usize, wait_seconds: i32) -> Result<Vec<Message>, BusError> {
        let max = i32::try_from(max.clamp(1, MAX_RECEIVE)).unwrap_or(1);
        let request = self
            .inner
            .sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(max)
            .wait_time_seconds(wait_seconds)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names("All")
            .send();
        let deadline = Duration::from_secs(u64::try_from(wait_seconds).unwrap_or(0)) + RECEIVE_GRACE;
        match tokio::time::timeout(deadline, request).await {
            Ok(Ok(out)) => Ok(out.messages.unwrap_or_default()),
            Ok(Err(err)) => Err(unavailable(format!(
                "receiving from sqs queue {queue_url}: {}",
                aws_sdk_sqs::error::DisplayErrorContext(err)
            ))),
            Err(_) => Err(unavailable(format!("receiving from sqs queue {queue_url}: no answer within {deadline:?}"))),
        }
    }

    /// The delivery a received message makes, or `None` when it cannot make one (a poison
    /// message is dead-lettered here).
    async fn delivery(&self, queue_url: &Arc<str>, message: Message) -> Option<Delivery> {
        let message_id = message.message_id().unwrap_or_default().to_owned();
        let Some(receipt_handle) = message.receipt_handle().filter(|handle| !handle.is_empty()) else {
            tracing::warn!(queue = %queue_url, %message_id, "sqs message without a receipt handle ignored");
            return None;
        };
        let mut event = match decode_body(message.body().unwrap_or_default()) {
            Ok(event) => event,
            Err(reason) => {
                self.dead_letter(queue_url, &message, receipt_handle, &reason).await;
                return None;
            }
        };
        if event.traceparent.is_none() {
            event.traceparent = string_attribute(&message, attributes::TRACEPARENT).map(str::to_owned);
        }
        let attempt = receive_count(&message);
        Some(Delivery {
            event: Arc::new(event),
            attempt,
            ack: Box::new(SqsAck {
                sqs: self.inner.sqs.clone(),
                acks: Arc::clone(&self.inner.acks),
                queue_url: Arc::clone(queue_url),
                receipt_handle: receipt_handle.to_owned(),
                message_id,
                visibility_timeout: whole_seconds_ceil(self.inner.config.visibility_timeout, MAX_VISIBILITY_TIMEOUT),
                nak_delay: self.inner.config.nak_delay,
            }),
        })
    }

    /// Sends a message that cannot be decoded to the dead-letter queue (with why) and deletes it.
    /// On any failure the message stays where it is, and the redrive policy moves it after
    /// `max_receive_count` receives anyway.
    async fn dead_letter(&self, queue_url: &str, message: &Message, receipt_handle: &str, reason: &str) {
        let message_id = message.message_id().unwrap_or_default();
        let consumer = &self.inner.consumer;
        let dead_letter_url = match self.dead_letter_queue_url().await {
            Ok(url) => url,
            Err(err) => {
                tracing::warn!(%consumer, queue = %queue_url, %message_id, %reason, error = %err, "undecodable sqs message left for the redrive policy");
                return;
            }
        };
        let body = message.body().filter(|body| !body.is_empty()).unwrap_or(EMPTY_BODY);
        let mut send = self
            .inner
            .sqs
            .send_message()
            .queue_url(&dead_letter_url)
            .message_body(body)
            .set_message_attributes(message.message_attributes().cloned());
        let attribute_count = message.message_attributes().map_or(0, |attributes| attributes.len());
        let reason_value = MessageAttributeValue::builder().data_type("String").string_value(truncate(reason)).build();
        if let (true, Ok(value)) = (attribute_count < MAX_ATTRIBUTES, reason_value) {
            send = send.message_attributes(attributes::DEAD_LETTER_REASON, value);
        }
        if let Err(err) = send.send().await {
            tracing::warn!(%consumer, queue = %dead_letter_url, %message_id, %reason, error = %aws_sdk_sqs::error::DisplayErrorContext(err), "could not dead-letter an undecodable sqs message; left for the redrive policy");
            return;
        }
        match self.inner.sqs.delete_message().queue_url(queue_url).receipt_handle(receipt_handle).send().await {
            Ok(_) => {
                tracing::warn!(%consumer, queue = %queue_url, dead_letter_queue = %dead_letter_url, %message_id, %reason, "undecodable sqs message moved to the dead-letter queue");
            }
            Err(err) => {
                // It is in the dead-letter queue already; it will come back once more and go again.
                tracing::warn!(%consumer, queue = %queue_url, %message_id, error = %aws_sdk_sqs::error::DisplayErrorContext(err), "undecodable sqs message dead-lettered but not deleted");
            }
        }
    }
}

#[async_trait]
impl EventConsumer for SqsConsumer {
    /// Long-polls for the first messages (SQS waits whole seconds: `wait` is rounded down and
    /// capped at `max_wait`, at most 20 s), then keeps receiving without waiting while messages
    /// come and fewer than `max` were collected.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let queue_url = self.resolved_queue_url().await?;
        let mut wait_seconds = whole_seconds_floor(wait, self.inner.config.max_wait.min(MAX_LONG_POLL));
        let mut deliveries = Vec::new();
        // Every receive but the last returns at least one message; poison ones do not count
        // towards `max`, so bound the receives as well.
        let max_receives = max.div_ceil(MAX_RECEIVE).saturating_add(2);
        for _ in 0..max_receives {
            let want = max.saturating_sub(deliveries.len()).min(MAX_RECEIVE);
            if want == 0 {
                break;
            }
            let messages = match self.receive(&queue_url, want, wait_seconds).await {
                Ok(messages) => messages,
                // Hand out what was received; the rest stays in the queue.
                Err(err) if !deliveries.is_empty() => {
                    tracing::warn!(consumer = %self.inner.consumer, error = %err, "sqs receive failed after some messages");
                    break;
                }
                Err(err) => return Err(err),
            };
            if messages.is_empty() {
                break;
            }
            for message in messages {
                if let Some(delivery) = self.delivery(&queue_url, message).await {
                    deliveries.push(delivery);
                }
            }
            wait_seconds = 0;
        }
        Ok(deliveries)
    }

    /// The queue's `ApproximateNumberOfMessages` (waiting) plus
    /// `ApproximateNumberOfMessagesNotVisible` (received, not deleted yet).
    async fn backlog(&self) -> Result<Option<u64>, BusError> {
        use aws_sdk_sqs::types::QueueAttributeName as Name;
        let queue_url = self.resolved_queue_url().await?;
        let out = self
            .inner
            .sqs
            .get_queue_attributes()
            .queue_url(queue_url.as_ref())
            .attribute_names(Name::ApproximateNumberOfMessages)
            .attribute_names(Name::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|err| {
                unavailable(format!(
                    "reading the attributes of sqs queue {queue_url}: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(err)
                ))
            })?;
        let attributes = out.attributes.unwrap_or_default();
        let count = |name: Name| attributes.get(&name).and_then(|value| value.parse::<u64>().ok()).unwrap_or(0);
        Ok(Some(count(Name::ApproximateNumberOfMessages) + count(Name::ApproximateNumberOfMessagesNotVisible)))
    }
}

/// A receipt handle to delete, with where its result goes.
type PendingAck = (String, oneshot::Sender<Result<(), String>>);

/// Acknowledgements waiting for a `DeleteMessageBatch` (see the module docs). One per consumer:
/// all its deliveries come from one queue.
#[derive(Default)]
struct AckBatcher {
    pending: std::sync::Mutex<Vec<PendingAck>>,
    /// Held by the `ack` sending a batch.
    flushing: tokio::sync::Mutex<()>,
}

impl AckBatcher {
    /// Deletes `receipt_handle` from `queue_url`, batched with the other pending acks.
    async fn delete(&self, sqs: &aws_sdk_sqs::Client, queue_url: &str, receipt_handle: &str) -> Result<(), String> {
        let (sender, mut result) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((receipt_handle.to_owned(), sender));
        loop {
            match result.try_recv() {
                Ok(settled) => return settled,
                Err(oneshot::error::TryRecvError::Closed) => return Err("the batch carrying it was abandoned".into()),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let _turn = self.flushing.lock().await;
            // Another flush may have carried ours while we waited for the turn.
            if let Ok(settled) = result.try_recv() {
                return settled;
            }
            let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            let mut entries = batch.into_iter().peekable();
            let mut chunks = Vec::new();
            while entries.peek().is_some() {
                chunks.push(entries.by_ref().take(MAX_DELETE_BATCH).collect::<Vec<_>>());
            }
            futures::future::join_all(chunks.into_iter().map(|chunk| delete_chunk(sqs, queue_url, chunk))).await;
        }
    }
}

/// One `DeleteMessageBatch`; every entry's sender gets its own outcome.
async fn delete_chunk(sqs: &aws_sdk_sqs::Client, queue_url: &str, chunk: Vec<PendingAck>) {
    let entries: Result<Vec<_>, _> = chunk
        .iter()
        .enumerate()
        .map(|(i, (handle, _))| {
            DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(handle).build()
        })
        .collect();
    let sent = match entries {
        Ok(entries) => sqs
            .delete_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|err| aws_sdk_sqs::error::DisplayErrorContext(err).to_string()),
        Err(err) => Err(format!("cannot build a delete batch: {err}")),
    };
    let outcomes: Vec<Result<(), String>> = match &sent {
        Ok(out) => {
            let mut outcomes = vec![Err("not in the DeleteMessageBatch answer".to_owned()); chunk.len()];
            for ok in out.successful() {
                if let Some(slot) = ok.id().parse::<usize>().ok().and_then(|i| outcomes.get_mut(i)) {
                    *slot = Ok(());
                }
            }
            for failed in out.failed() {
                if let Some(slot) = failed.id().parse::<usize>().ok().and_then(|i| outcomes.get_mut(i)) {
                    *slot = Err(format!("{}: {}", failed.code(), failed.message().unwrap_or_default()));
                }
            }
            outcomes
        }
        Err(err) => vec![Err(err.clone()); chunk.len()],
    };
    for ((_, sender), outcome) in chunk.into_iter().zip(outcomes) {
        // The waiting ack may have been dropped: nothing to tell then.
        let _ = sender.send(outcome);
    }
}

/// Settles one received message by its receipt handle.
struct SqsAck {
    sqs: aws_sdk_sqs::Client,
    acks: Arc<AckBatcher>,
    queue_url: Arc<str>,
    receipt_handle: String,
    message_id: String,
    visibility_timeout: i32,
    nak_delay: Duration,
}

impl SqsAck {
    async fn change_visibility(&self, seconds: i32, why: &str) -> Result<(), BusError> {
        self.sqs
            .change_message_visibility()
            .queue_url(self.queue_url.as_ref())
            .receipt_handle(&self.receipt_handle)
            .visibility_timeout(seconds)
            .send()
            .await
            .map_err(|err| {
                unavailable(format!(
                    "{why} message {} of sqs queue {} (visibility {seconds} s): {}",
                    self.message_id,
                    self.queue_url,
                    aws_sdk_sqs::error::DisplayErrorContext(err)
                ))
            })?;
        Ok(())
    }
}

#[async_trait]
impl Acknowledge for SqsAck {
    /// Deletes the message from the queue (batched with the acks pending at the same time).
    async fn ack(&self) -> Result<(), BusError> {
        self.acks.delete(&self.sqs, &self.queue_url, &self.receipt_handle).await.map_err(|err| {
            unavailable(format!(
                "acknowledging (deleting) message {} of sqs queue {}: {err}",
                self.message_id, self.queue_url
            ))
        })
    }

    /// Makes the message visible again after `delay` (default: the configured `nak_delay`; whole
    /// seconds, rounded up, at most 12 h). On the last allowed attempt the message is not moved
    /// here: the queue's redrive policy moves it to the dead-letter queue on its next receive.
    async fn nak(&self, delay: Option<Duration>) -> Result<(), BusError> {
        let seconds = whole_seconds_ceil(delay.unwrap_or(self.nak_delay), MAX_VISIBILITY_TIMEOUT);
        self.change_visibility(seconds, "rejecting (nak)").await
    }

    /// Renews the lease: the message stays invisible for a full visibility timeout from now.
    async fn in_progress(&self) -> Result<(), BusError> {
        self.change_visibility(self.visibility_timeout, "extending").await
    }
}

/// The event in a message body: base64 of the protobuf encoding. The error says what is wrong
/// without echoing the body.
pub(super) fn decode_body(body: &str) -> Result<ResourceChanged, String> {
    let bytes = BASE64.decode(body.trim()).map_err(|err| format!("body is not base64: {err}"))?;
    fhirmesh_proto::decode_resource_changed(Bytes::from(bytes)).map_err(|err| format!("body is not an event: {err}"))
}

/// `ApproximateReceiveCount`: 1 on the first delivery (and when SQS does not say).
pub(super) fn receive_count(message: &Message) -> u32 {
    message
        .attributes()
        .and_then(|attributes| attributes.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|count| count.trim().parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

fn string_attribute<'m>(message: &'m Message, name: &str) -> Option<&'m str> {
    message.message_attributes()?.get(name)?.string_value().filter(|value| !value.is_empty())
}

/// Whole seconds for a long-poll wait, rounded down and capped at `max`.
pub(super) fn whole_seconds_floor(duration: Duration, max: Duration) -> i32 {
    i32::try_from(duration.min(max).as_secs()).unwrap_or(i32::MAX)
}

fn truncate(reason: &str) -> String {
    reason.chars().take(MAX_REASON_CHARS).collect()
}
