//! SNS + SQS: publisher (one topic), durable consumer (one queue per service, with a DLQ), provisioning.
//!
//! Layout on AWS, for a topic `T`, a queue prefix `P` and a consumer service `C`:
//!
//! ```text
//! publisher ──PublishBatch──▶ SNS topic T ──(raw delivery)──▶ SQS queue P-C ──(redrive)──▶ SQS queue P-C-dlq
//! ```
//!
//! - **Standard topic and queues, not FIFO.** Consumers are idempotent on
//!   (tenant, type, id, version) and never let an older version overwrite a newer one, so they
//!   tolerate both the duplicates and the reordering a standard topic allows; FIFO would cap
//!   throughput (300 publishes/s per topic) and buy nothing they need.
//! - **Body**: base64 of the protobuf encoding ([`fhirmesh_proto::encode_resource_changed`]): SNS
//!   messages are strings. **Message attributes**: `idempotency-key`, `tenant`, `resource-type`
//!   (so a subscription could filter) and `traceparent` when known. With `RawMessageDelivery` the
//!   queue receives the body and the attributes as published, without the SNS JSON envelope.
//! - **At-least-once**: a delivery that is neither acknowledged nor extended becomes visible again
//!   after the queue's visibility timeout; `nak` makes it visible after a short delay. SQS counts
//!   receives (`ApproximateReceiveCount`, reported as [`Delivery::attempt`]); the queue's redrive
//!   policy moves a message to the dead-letter queue when a receive would exceed
//!   `max_receive_count`. So a `nak` on the last attempt does not move the message itself: it makes
//!   it visible again and SQS moves it on its next receive, without delivering it.
//! - **Poison messages** (a body that does not decode) are never handed out: the consumer sends
//!   them to the dead-letter queue itself, with a `dead-letter-reason` attribute, and deletes them.
//!
//! What it is not: the relay loop or any consumer logic (those are in `fhirmesh-core`).

mod consumer;
mod publish;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use aws_types::SdkConfig;
use fhirmesh_core::ports::BusError;
use tokio::sync::OnceCell;

pub use consumer::SqsConsumer;

/// Names of the message attributes every event carries (SNS publishes them; with raw delivery
/// they arrive as SQS message attributes).
pub mod attributes {
    /// [`ResourceChanged::idempotency_key`](fhirmesh_core::ResourceChanged::idempotency_key).
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    /// The tenant id.
    pub const TENANT: &str = "tenant";
    /// The FHIR resource type (for subscription filter policies).
    pub const RESOURCE_TYPE: &str = "resource-type";
    /// W3C trace context of the write, when known.
    pub const TRACEPARENT: &str = "traceparent";
    /// Set by the consumer on a message it dead-letters itself: why it could not be used.
    pub const DEAD_LETTER_REASON: &str = "dead-letter-reason";
}

/// The SQS long-poll limit: `ReceiveMessage` waits at most 20 seconds.
pub const MAX_LONG_POLL: Duration = Duration::from_secs(20);
/// The longest SQS visibility timeout (12 hours).
pub const MAX_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(12 * 60 * 60);
/// The longest SQS message retention (14 days).
pub const MAX_RETENTION: Duration = Duration::from_secs(14 * 24 * 60 * 60);
/// The shortest SQS message retention (1 minute).
pub const MIN_RETENTION: Duration = Duration::from_secs(60);
/// SQS queue names are at most 80 characters.
const MAX_QUEUE_NAME: usize = 80;
/// SNS topic names are at most 256 characters.
const MAX_TOPIC_NAME: usize = 256;
/// The suffix of a consumer's dead-letter queue.
const DLQ_SUFFIX: &str = "-dlq";

/// Settings of the SNS + SQS bus. Every service of a deployment must use the same `topic_name`
/// and `queue_prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnsSqsConfig {
    /// Name of the standard SNS topic the events are published to (default `fhirmesh-changes`).
    pub topic_name: String,
    /// Consumer queues are named `{queue_prefix}-{consumer}` and `{queue_prefix}-{consumer}-dlq`
    /// (default `fhirmesh`).
    pub queue_prefix: String,
    /// How long a received message stays invisible before SQS redelivers it; also the lease
    /// [`Acknowledge::in_progress`](fhirmesh_core::ports::Acknowledge::in_progress) renews
    /// (default 30 s, at most 12 h; SQS counts whole seconds, so a fraction rounds up).
    pub visibility_timeout: Duration,
    /// Receives before the redrive policy moves a message to the dead-letter queue (default 5,
    /// 1 to 1000).
    pub max_receive_count: u32,
    /// How long a consumer queue keeps an unconsumed message (default 4 days, 1 min to 14 days).
    pub message_retention: Duration,
    /// How long a dead-letter queue keeps a message (default 14 days, the SQS maximum).
    pub dead_letter_retention: Duration,
    /// The longest a single `ReceiveMessage` long-polls (default and maximum 20 s, the SQS limit).
    /// SQS waits whole seconds: a `fetch` wait is rounded down, so under a second is a short poll.
    pub max_wait: Duration,
    /// The redelivery delay of a `nak` without an explicit delay (default 5 s).
    pub nak_delay: Duration,
    /// Attempts per `PublishBatch` before a publish fails with [`BusError::Unavailable`]
    /// (default 5; failed entries are retried with exponential back-off and jitter).
    pub publish_attempts: u32,
}

impl Default for SnsSqsConfig {
    fn default() -> Self {
        SnsSqsConfig {
            topic_name: "fhirmesh-changes".to_owned(),
            queue_prefix: "fhirmesh".to_owned(),
            visibility_timeout: Duration::from_secs(30),
            max_receive_count: 5,
            message_retention: Duration::from_secs(4 * 24 * 60 * 60),
            dead_letter_retention: MAX_RETENTION,
            max_wait: MAX_LONG_POLL,
            nak_delay: Duration::from_secs(5),
            publish_attempts: 5,
        }
    }
}

impl SnsSqsConfig {
    /// Checks every value against the SNS and SQS limits; the message says which one is wrong.
    pub fn validate(&self) -> Result<(), BusError> {
        check_name("topic name", &self.topic_name, MAX_TOPIC_NAME)?;
        // The shortest queue name the prefix can make: `{prefix}-x-dlq`.
        check_name("queue prefix", &self.queue_prefix, MAX_QUEUE_NAME - 2 - DLQ_SUFFIX.len())?;
        if self.visibility_timeout > MAX_VISIBILITY_TIMEOUT {
            return Err(invalid(format!(
                "visibility timeout {:?} is over the SQS maximum of 12 hours",
                self.visibility_timeout
            )));
        }
        if !(1..=1000).contains(&self.max_receive_count) {
            return Err(invalid(format!("max receive count {} is not within 1 to 1000", self.max_receive_count)));
        }
        for (what, retention) in
            [("message retention", self.message_retention), ("dead-letter retention", self.dead_letter_retention)]
        {
            if !(MIN_RETENTION..=MAX_RETENTION).contains(&retention) {
                return Err(invalid(format!("{what} {retention:?} is not within 1 minute to 14 days")));
            }
        }
        if self.publish_attempts == 0 {
            return Err(invalid("publish attempts must be at least 1".to_owned()));
        }
        Ok(())
    }

    /// The queue a consumer service reads: `{queue_prefix}-{consumer}`.
    pub fn queue_name(&self, consumer: &str) -> String {
        format!("{}-{consumer}", self.queue_prefix)
    }

    /// The dead-letter queue of a consumer service: `{queue_prefix}-{consumer}-dlq`.
    pub fn dead_letter_queue_name(&self, consumer: &str) -> String {
        format!("{}-{consumer}{DLQ_SUFFIX}", self.queue_prefix)
    }

    /// Checks that a consumer name makes valid queue names with this prefix.
    fn check_consumer(&self, consumer: &str) -> Result<(), BusError> {
        check_name("consumer name", consumer, MAX_QUEUE_NAME)?;
        let longest = self.dead_letter_queue_name(consumer);
        if longest.len() > MAX_QUEUE_NAME {
            return Err(invalid(format!(
                "queue name '{longest}' for consumer '{consumer}' is longer than {MAX_QUEUE_NAME} characters"
            )));
        }
        Ok(())
    }
}

/// What [`SnsSqsBus::provision`] created or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub topic_arn: String,
    /// One per consumer, in the order given.
    pub queues: Vec<ProvisionedQueue>,
}

/// One consumer's queues and subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedQueue {
    pub consumer: String,
    pub queue_url: String,
    pub queue_arn: String,
    pub dead_letter_queue_url: String,
    pub dead_letter_queue_arn: String,
    pub subscription_arn: String,
}

/// The SNS + SQS event bus: publishes to one topic ([`fhirmesh_core::ports::EventPublisher`]) and
/// hands out durable consumers ([`SnsSqsBus::consumer`]). Cheap to clone.
#[derive(Clone)]
pub struct SnsSqsBus {
    inner: Arc<Inner>,
}

struct Inner {
    sns: aws_sdk_sns::Client,
    sqs: aws_sdk_sqs::Client,
    config: SnsSqsConfig,
    /// Set by `provision`, or looked up by name on the first publish.
    topic_arn: OnceCell<String>,
    /// Queue URLs learnt by `provision`, by consumer name.
    queues: Mutex<HashMap<String, QueueUrls>>,
}

/// Where a consumer reads and where its dead letters go.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QueueUrls {
    queue: String,
    dead_letter: String,
}

impl std::fmt::Debug for SnsSqsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnsSqsBus").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl SnsSqsBus {
    /// A bus using SNS and SQS clients built from shared AWS configuration (credentials, region,
    /// endpoint). Nothing is contacted until the first call.
    pub fn new(sdk_config: &SdkConfig, config: SnsSqsConfig) -> Self {
        Self::from_clients(aws_sdk_sns::Client::new(sdk_config), aws_sdk_sqs::Client::new(sdk_config), config)
    }

    /// A bus using existing clients (for per-service client settings).
    pub fn from_clients(sns: aws_sdk_sns::Client, sqs: aws_sdk_sqs::Client, config: SnsSqsConfig) -> Self {
        SnsSqsBus {
            inner: Arc::new(Inner { sns, sqs, config, topic_arn: OnceCell::new(), queues: Mutex::new(HashMap::new()) }),
        }
    }

    pub fn config(&self) -> &SnsSqsConfig {
        &self.inner.config
    }

    /// Creates what the bus needs, idempotently: the topic, and for each consumer service a queue
    /// `{prefix}-{consumer}` with its dead-letter queue `{prefix}-{consumer}-dlq` (redrive after
    /// `max_receive_count` receives), a queue policy that lets the topic send to it, and a raw
    /// delivery subscription of the queue to the topic. Existing resources are kept and their
    /// attributes set to this configuration, so running it again changes nothing (and running it
    /// with a new configuration applies it). Publishers and consumers of this bus use what it
    /// returns without looking it up again.
    pub async fn provision(&self, consumers: &[&str]) -> Result<Provisioned, BusError> {
        let config = &self.inner.config;
        config.validate()?;
        for consumer in consumers {
            config.check_consumer(consumer)?;
        }
        let topic_arn = self.create_topic().await?;
        let mut queues = Vec::with_capacity(consumers.len());
        for consumer in consumers {
            let queue = self.provision_consumer(&topic_arn, consumer).await?;
            tracing::info!(consumer = %consumer, queue = %queue.queue_url, topic = %topic_arn, "sqs consumer queue provisioned");
            self.remember_queues(
                consumer,
                QueueUrls { queue: queue.queue_url.clone(), dead_letter: queue.dead_letter_queue_url.clone() },
            );
            queues.push(queue);
        }
        Ok(Provisioned { topic_arn, queues })
    }

    /// A durable consumer reading the queue of service `consumer` (see [`SnsSqsBus::provision`]).
    /// Its queue URLs are looked up on first use unless this bus provisioned them; an invalid name
    /// is reported by the first `fetch`.
    pub fn consumer(&self, consumer: &str) -> SqsConsumer {
        let known = self.known_queues(consumer);
        SqsConsumer::new(self.inner.sqs.clone(), self.inner.config.clone(), consumer, known)
    }

    /// The topic's ARN: the one `provision` made, or else found by name among the account's topics
    /// (publishing needs no permission to create topics).
    pub async fn topic_arn(&self) -> Result<String, BusError> {
        self.inner.topic_arn.get_or_try_init(|| self.find_topic()).await.cloned()
    }

    async fn create_topic(&self) -> Result<String, BusError> {
        let name = &self.inner.config.topic_name;
        let out = self.inner.sns.create_topic().name(name).send().await.map_err(|err| {
            unavailable(format!("creating sns topic '{name}': {}", aws_sdk_sns::error::DisplayErrorContext(err)))
        })?;
        let arn = out
            .topic_arn()
            .filter(|arn| !arn.is_empty())
            .ok_or_else(|| unavailable(format!("creating sns topic '{name}': the response has no topic arn")))?
            .to_owned();
        // Already set (an earlier provision) is fine: CreateTopic returns the same ARN.
        let _ = self.inner.topic_arn.set(arn.clone());
        Ok(arn)
    }

    async fn find_topic(&self) -> Result<String, BusError> {
        let name = &self.inner.config.topic_name;
        let suffix = format!(":{name}");
        let mut next_token: Option<String> = None;
        // Bounded: 100 topics a page, and an account has at most 100,000 topics.
        for _ in 0..1_000 {
            let out = self.inner.sns.list_topics().set_next_token(next_token.take()).send().await.map_err(|err| {
                unavailable(format!("looking up sns topic '{name}': {}", aws_sdk_sns::error::DisplayErrorContext(err)))
            })?;
            if let Some(arn) =
                out.topics().iter().filter_map(|topic| topic.topic_arn()).find(|arn| arn.ends_with(&suffix))
            {
                return Ok(arn.to_owned());
            }
            match out.next_token() {
                Some(token) if !token.is_empty() => next_token = Some(token.to_owned()),
                _ => break,
            }
        }
        Err(unavailable(format!("sns topic '{name}' does not exist: provision the bus first")))
    }

    async fn provision_consumer(&self, topic_arn: &str, consumer: &str) -> Result<ProvisionedQueue, BusError> {
        let config = &self.inner.config;
        let dlq_name = config.dead_letter_queue_name(consumer);
        let dlq_url = self.create_queue(&dlq_name).await?;
        self.set_queue_attributes(
            &dlq_url,
            vec![(
                QueueAttributeName::MessageRetentionPeriod,
                whole_seconds_ceil(config.dead_letter_retention, MAX_RETENTION).to_string(),
            )],
        )
        .await?;
        let dlq_arn = self.queue_arn(&dlq_url).await?;

        let queue_name = config.queue_name(consumer);
        let queue_url = self.create_queue(&queue_name).await?;
        let queue_arn = self.queue_arn(&queue_url).await?;
        self.set_queue_attributes(
            &queue_url,
            vec![
                (
                    QueueAttributeName::VisibilityTimeout,
                    whole_seconds_ceil(config.visibility_timeout, MAX_VISIBILITY_TIMEOUT).to_string(),
                ),
                (
                    QueueAttributeName::MessageRetentionPeriod,
                    whole_seconds_ceil(config.message_retention, MAX_RETENTION).to_string(),
                ),
                (QueueAttributeName::RedrivePolicy, redrive_policy(&dlq_arn, config.max_receive_count)),
                (QueueAttributeName::Policy, topic_may_send_policy(&queue_arn, topic_arn)),
            ],
        )
        .await?;

        // Subscribe is idempotent: the same topic, protocol, endpoint and attributes give back the
        // existing subscription.
        let out = self
            .inner
            .sns
            .subscribe()
            .topic_arn(topic_arn)
            .protocol("sqs")
            .endpoint(&queue_arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true)
            .send()
            .await
            .map_err(|err| {
                unavailable(format!(
                    "subscribing sqs queue '{queue_name}' to sns topic {topic_arn}: {}",
                    aws_sdk_sns::error::DisplayErrorContext(err)
                ))
            })?;
        let subscription_arn = out.subscription_arn().unwrap_or_default().to_owned();

        Ok(ProvisionedQueue {
            consumer: consumer.to_owned(),
            queue_url,
            queue_arn,
            dead_letter_queue_url: dlq_url,
            dead_letter_queue_arn: dlq_arn,
            subscription_arn,
        })
    }

    /// Creates a queue by name alone (which returns the existing queue whatever its attributes);
    /// attributes are set separately so that a changed configuration is applied, not refused.
    async fn create_queue(&self, name: &str) -> Result<String, BusError> {
        let out = self.inner.sqs.create_queue().queue_name(name).send().await.map_err(|err| {
            unavailable(format!("creating sqs queue '{name}': {}", aws_sdk_sqs::error::DisplayErrorContext(err)))
        })?;
        out.queue_url()
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| unavailable(format!("creating sqs queue '{name}': the response has no queue url")))
    }

    async fn queue_arn(&self, queue_url: &str) -> Result<String, BusError> {
        let out = self
            .inner
            .sqs
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|err| {
                unavailable(format!(
                    "reading the arn of sqs queue {queue_url}: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(err)
                ))
            })?;
        out.attributes()
            .and_then(|attributes| attributes.get(&QueueAttributeName::QueueArn))
            .filter(|arn| !arn.is_empty())
            .cloned()
            .ok_or_else(|| unavailable(format!("reading the arn of sqs queue {queue_url}: the response has none")))
    }

    async fn set_queue_attributes(
        &self,
        queue_url: &str,
        attributes: Vec<(QueueAttributeName, String)>,
    ) -> Result<(), BusError> {
        let names: Vec<String> = attributes.iter().map(|(name, _)| name.as_str().to_owned()).collect();
        self.inner
            .sqs
            .set_queue_attributes()
            .queue_url(queue_url)
            .set_attributes(Some(attributes.into_iter().collect()))
            .send()
            .await
            .map_err(|err| {
                unavailable(format!(
                    "setting {} of sqs queue {queue_url}: {}",
                    names.join(", "),
                    aws_sdk_sqs::error::DisplayErrorContext(err)
                ))
            })?;
        Ok(())
    }

    fn remember_queues(&self, consumer: &str, urls: QueueUrls) {
        let mut queues = self.inner.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        queues.insert(consumer.to_owned(), urls);
    }

    fn known_queues(&self, consumer: &str) -> Option<QueueUrls> {
        let queues = self.inner.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        queues.get(consumer).cloned()
    }
}

/// The queue's redrive policy: dead letters after `max_receive_count` receives.
fn redrive_policy(dead_letter_arn: &str, max_receive_count: u32) -> String {
    format!(r#"{{"deadLetterTargetArn":{},"maxReceiveCount":{max_receive_count}}}"#, json_string(dead_letter_arn))
}

/// The queue policy that lets SNS deliver messages from `topic_arn` (and no other topic).
fn topic_may_send_policy(queue_arn: &str, topic_arn: &str) -> String {
    format!(
        concat!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Sid":"fhirmesh-topic-to-queue","Effect":"Allow","#,
            r#""Principal":{{"Service":"sns.amazonaws.com"}},"Action":"sqs:SendMessage","Resource":{},"#,
            r#""Condition":{{"ArnEquals":{{"aws:SourceArn":{}}}}}}}]}}"#
        ),
        json_string(queue_arn),
        json_string(topic_arn)
    )
}

/// A JSON string literal (ARNs never need escaping, but nothing here trusts that).
fn json_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// SNS topic and SQS queue names: 1 to `max` characters of A-Z, a-z, 0-9, `-` and `_`.
fn check_name(what: &str, value: &str, max: usize) -> Result<(), BusError> {
    let valid_chars = value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if value.is_empty() || value.len() > max || !valid_chars {
        return Err(invalid(format!(
            "{what} '{}' must be 1 to {max} characters of A-Z, a-z, 0-9, '-' and '_'",
            value.escape_debug()
        )));
    }
    Ok(())
}

fn invalid(detail: String) -> BusError {
    BusError::Unavailable(format!("invalid sns/sqs bus configuration: {detail}"))
}

fn unavailable(detail: String) -> BusError {
    BusError::Unavailable(detail)
}

/// Whole seconds for an SQS duration parameter, rounded up and capped at `max`.
fn whole_seconds_ceil(duration: Duration, max: Duration) -> i32 {
    let capped = duration.min(max);
    let secs = capped.as_secs() + u64::from(capped.subsec_nanos() > 0);
    i32::try_from(secs.min(max.as_secs())).unwrap_or(i32::MAX)
}
