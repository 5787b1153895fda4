//! Settings of the NATS JetStream adapter, and the checks they must pass before anything connects.

use std::fmt;
use std::time::Duration;

use super::wire::redact_url;

/// Where the NATS JetStream bus connects, how it lays out its streams, and how its durable
/// consumers redeliver. Build one with struct-update syntax over [`NatsConfig::default`].
/// Its `Debug` output hides credentials in the URL.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas (`nats://10.0.0.1:4222,nats://10.0.0.2:4222`).
    /// Credentials in the URL (`nats://user:pass@host`) are never logged or put in errors.
    pub url: String,
    /// The connection name the server reports (`/connz`), to tell services apart.
    pub connection_name: String,
    /// The change stream: holds every `ResourceChanged` event.
    pub stream: String,
    /// Events go to `{subject_prefix}.{tenant}.{resource_type}`; the stream captures
    /// `{subject_prefix}.>`.
    pub subject_prefix: String,
    /// The dead-letter stream: events a consumer gave up on.
    pub dead_letter_stream: String,
    /// Dead letters go to `{dead_letter_subject_prefix}.{durable_name}`; the dead-letter stream
    /// captures `{dead_letter_subject_prefix}.>`.
    pub dead_letter_subject_prefix: String,
    /// How long the stream remembers a `Nats-Msg-Id`: a publish retried within it is stored once.
    pub duplicate_window: Duration,
    /// How long a delivery may stay unacknowledged before the server delivers it again.
    pub ack_wait: Duration,
    /// Deliveries of one event to one consumer before it is dead-lettered; `-1` for no limit.
    pub max_deliver: i64,
    /// Deliveries a consumer may hold unacknowledged at once; `-1` for no limit.
    pub max_ack_pending: i64,
    /// Bound on one connection attempt (TCP, TLS and the NATS handshake).
    pub connect_timeout: Duration,
    /// Attempts at the initial connection before [`NatsBus::connect`](super::NatsBus::connect)
    /// gives up. Once connected, the client reconnects on its own, without limit.
    pub connect_attempts: u32,
    /// Bound on every JetStream API request, publish acknowledgement and confirmed ack.
    pub request_timeout: Duration,
    /// Attempts at publishing a batch through transient failures (time-outs, no responders while
    /// the server restarts) before the publish fails.
    pub publish_attempts: u32,
    /// The first delay of the default back-off of [`Acknowledge::nak`]
    /// (`nak(None)`): it doubles on every attempt, up to `max_nak_delay`.
    ///
    /// [`Acknowledge::nak`]: fhirmesh_core::ports::Acknowledge::nak
    pub nak_delay: Duration,
    /// The ceiling of the default `nak` back-off.
    pub max_nak_delay: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_owned(),
            connection_name: "fhirmesh".to_owned(),
            stream: "FHIRMESH_CHANGES".to_owned(),
            subject_prefix: "fhirmesh.changes".to_owned(),
            dead_letter_stream: "FHIRMESH_DLQ".to_owned(),
            dead_letter_subject_prefix: "fhirmesh.dlq".to_owned(),
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            max_ack_pending: 1_000,
            connect_timeout: Duration::from_secs(5),
            connect_attempts: 5,
            request_timeout: Duration::from_secs(5),
            publish_attempts: 5,
            nak_delay: Duration::from_secs(1),
            max_nak_delay: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("connection_name", &self.connection_name)
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .field("dead_letter_stream", &self.dead_letter_stream)
            .field("dead_letter_subject_prefix", &self.dead_letter_subject_prefix)
            .field("duplicate_window", &self.duplicate_window)
            .field("ack_wait", &self.ack_wait)
            .field("max_deliver", &self.max_deliver)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("connect_timeout", &self.connect_timeout)
            .field("connect_attempts", &self.connect_attempts)
            .field("request_timeout", &self.request_timeout)
            .field("publish_attempts", &self.publish_attempts)
            .field("nak_delay", &self.nak_delay)
            .field("max_nak_delay", &self.max_nak_delay)
            .finish()
    }
}

/// A [`NatsConfig`] that cannot work; the message names the field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidNatsConfig(pub String);

impl fmt::Display for InvalidNatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid NATS configuration: {}", self.0)
    }
}

impl std::error::Error for InvalidNatsConfig {}

impl NatsConfig {
    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), InvalidNatsConfig> {
        let invalid = |message: String| Err(InvalidNatsConfig(message));
        if self.url.split(',').all(|url| url.trim().is_empty()) {
            return invalid("url: no server URL given".to_owned());
        }
        if self.connection_name.contains(['\r', '\n']) {
            return invalid("connection_name: must not contain line breaks".to_owned());
        }
        for (field, name) in [("stream", &self.stream), ("dead_letter_stream", &self.dead_letter_stream)] {
            if let Err(reason) = check_name(name) {
                return invalid(format!("{field} '{name}': {reason}"));
            }
        }
        if self.stream == self.dead_letter_stream {
            return invalid(format!("stream and dead_letter_stream are both '{}'", self.stream));
        }
        for (field, prefix) in
            [("subject_prefix", &self.subject_prefix), ("dead_letter_subject_prefix", &self.dead_letter_subject_prefix)]
        {
            if let Err(reason) = check_subject_prefix(prefix) {
                return invalid(format!("{field} '{prefix}': {reason}"));
            }
        }
        if prefixes_overlap(&self.subject_prefix, &self.dead_letter_subject_prefix) {
            return invalid(format!(
                "subject_prefix '{}' and dead_letter_subject_prefix '{}' overlap: the two streams would \
                 capture the same subjects",
                self.subject_prefix, self.dead_letter_subject_prefix
            ));
        }
        for (field, value) in [
            ("ack_wait", self.ack_wait),
            ("duplicate_window", self.duplicate_window),
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return invalid(format!("{field} must be longer than zero"));
            }
        }
        if self.max_nak_delay < self.nak_delay {
            return invalid("max_nak_delay is shorter than nak_delay".to_owned());
        }
        for (field, value) in [("max_deliver", self.max_deliver), ("max_ack_pending", self.max_ack_pending)] {
            if value == 0 || value < -1 {
                return invalid(format!("{field} is {value}: use -1 for no limit, or a positive number"));
            }
        }
        for (field, value) in [("connect_attempts", self.connect_attempts), ("publish_attempts", self.publish_attempts)]
        {
            if value == 0 {
                return invalid(format!("{field} must be at least 1"));
            }
        }
        Ok(())
    }

    /// The subjects the change stream captures.
    pub fn stream_subjects(&self) -> String {
        format!("{}.>", self.subject_prefix)
    }

    /// The subjects the dead-letter stream captures.
    pub fn dead_letter_stream_subjects(&self) -> String {
        format!("{}.>", self.dead_letter_subject_prefix)
    }
}

/// A stream or durable consumer name: one subject token the server also uses as a file name.
pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > 128 {
        return Err("must be at most 128 bytes");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\')) {
        return Err("must not contain whitespace, control characters, '.', '*', '>', '/' or '\\'");
    }
    Ok(())
}

/// A literal subject of one or more tokens, with no wildcards.
fn check_subject_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() {
        return Err("must not be empty");
    }
    for token in prefix.split('.') {
        if token.is_empty() {
            return Err("must not start or end with '.', nor contain '..'");
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '*' | '>')) {
            return Err("must not contain whitespace, control characters or the wildcards '*' and '>'");
        }
    }
    Ok(())
}

/// Whether `a.>` and `b.>` match a common subject: one prefix's tokens start the other's.
fn prefixes_overlap(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    a.iter().zip(&b).all(|(x, y)| x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_configuration_is_valid() {
        assert_eq!(NatsConfig::default().validate(), Ok(()));
        assert_eq!(NatsConfig::default().stream_subjects(), "fhirmesh.changes.>");
        assert_eq!(NatsConfig::default().dead_letter_stream_subjects(), "fhirmesh.dlq.>");
    }

    #[test]
    fn overlapping_subject_prefixes_are_rejected() {
        assert!(prefixes_overlap("a.b", "a.b"));
        assert!(prefixes_overlap("a", "a.b"));
        assert!(prefixes_overlap("a.b.c", "a.b"));
        assert!(!prefixes_overlap("a.b", "a.c"));
        assert!(!prefixes_overlap("ab", "a"));
        let config =
            NatsConfig { dead_letter_subject_prefix: "fhirmesh.changes.dlq".to_owned(), ..NatsConfig::default() };
        let err = config.validate().expect_err("overlap must be rejected");
        assert!(err.to_string().contains("overlap"), "{err}");
    }

    #[test]
    fn malformed_names_and_prefixes_are_rejected_with_the_field_named() {
        let cases = [
            (NatsConfig { url: " , ".to_owned(), ..NatsConfig::default() }, "url"),
            (NatsConfig { stream: "A.B".to_owned(), ..NatsConfig::default() }, "stream 'A.B'"),
            (NatsConfig { dead_letter_stream: String::new(), ..NatsConfig::default() }, "dead_letter_stream"),
            (NatsConfig { dead_letter_stream: "FHIRMESH_CHANGES".to_owned(), ..NatsConfig::default() }, "both"),
            (NatsConfig { subject_prefix: "a.*".to_owned(), ..NatsConfig::default() }, "subject_prefix 'a.*'"),
            (NatsConfig { subject_prefix: "a..b".to_owned(), ..NatsConfig::default() }, "subject_prefix"),
            (NatsConfig { subject_prefix: "a.b.".to_owned(), ..NatsConfig::default() }, "subject_prefix"),
            (NatsConfig { dead_letter_subject_prefix: "x y".to_owned(), ..NatsConfig::default() }, "dead_letter"),
            (NatsConfig { ack_wait: Duration::ZERO, ..NatsConfig::default() }, "ack_wait"),
            (NatsConfig { max_deliver: 0, ..NatsConfig::default() }, "max_deliver"),
            (NatsConfig { max_ack_pending: -5, ..NatsConfig::default() }, "max_ack_pending"),
            (NatsConfig { publish_attempts: 0, ..NatsConfig::default() }, "publish_attempts"),
            (NatsConfig { max_nak_delay: Duration::from_millis(1), ..NatsConfig::default() }, "max_nak_delay"),
        ];
        for (config, field) in cases {
            let err = config.validate().expect_err(field);
            assert!(err.to_string().contains(field), "expected '{field}' in '{err}'");
        }
    }

    #[test]
    fn debug_output_hides_credentials() {
        let config = NatsConfig { url: "nats://svc:hunter2@nats:4222".to_owned(), ..NatsConfig::default() };
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("nats://***@nats:4222"), "{shown}");
    }

    #[test]
    fn unlimited_deliveries_are_allowed() {
        let config = NatsConfig { max_deliver: -1, max_ack_pending: -1, ..NatsConfig::default() };
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn names_must_be_single_subject_tokens() {
        assert_eq!(check_name("indexer-1_a"), Ok(()));
        for bad in ["", "a.b", "a b", "a*", "a>", "a/b", "a\\b", "a\nb"] {
            assert!(check_name(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(check_name(&"x".repeat(129)).is_err());
    }
}
