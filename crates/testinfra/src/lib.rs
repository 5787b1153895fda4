//! Where the integration tests find their real servers. `make test` (and `.ci/run`) run the tests
//! under `tools/testinfra/with-infra.sh`, which starts moto and nats-server on free ports of
//! 127.0.0.1 and exports their addresses; a test run without them fails with a message saying so,
//! rather than skipping silently.

pub mod tls;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;

fn required(var: &str, what: &str) -> String {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{var} is not set: this test needs {what}. Run the tests with `make test` (it starts the servers), \
             or `tools/testinfra/with-infra.sh cargo test ...`"
        ),
    }
}

/// The moto server standing in for DynamoDB, DynamoDB Streams, S3, SQS and SNS.
pub fn aws_endpoint() -> String {
    required("FHIRMESH_TEST_AWS_ENDPOINT", "moto (moto_server)")
}

/// The nats-server with JetStream.
pub fn nats_url() -> String {
    required("FHIRMESH_TEST_NATS_URL", "nats-server with JetStream")
}

/// The single-node OpenSearch (tests/support/opensearch-node), e.g. `http://127.0.0.1:41234`.
pub fn opensearch_url() -> String {
    required("FHIRMESH_TEST_OPENSEARCH_URL", "OpenSearch (tests/support/opensearch-node)")
}

/// AWS SDK configuration for moto: its endpoint, region us-east-1, dummy static credentials.
pub async fn aws_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(aws_endpoint())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "fhirmesh-tests"))
        .load()
        .await
}

/// A name no other test (or earlier run against the same server) uses: `{prefix}-{random}`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}
