//! Configuration: typed, layered defaults → file (TOML) → environment (`FHIRMESH_SECTION__KEY`) →
//! command-line flags, validated once at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub search: SearchSection,
    pub opensearch: OpenSearchSection,
    pub aws: AwsConfig,
    pub dynamodb: DynamoDbConfig,
    pub bus: BusConfig,
    pub nats: NatsSection,
    pub sns_sqs: SnsSqsSection,
    pub blob: BlobConfig,
    pub relay: RelaySection,
    pub resource: ResourceSection,
    pub gateway: GatewaySection,
    pub notifier: NotifierSection,
    pub export: ExportSection,
    pub binary: BinarySection,
    pub auth: AuthConfig,
    pub tenancy: TenancyConfig,
    pub audit: AuditConfig,
    pub log: LogConfig,
    pub ops: OpsSection,
    pub grpc: GrpcSection,
    pub telemetry: TelemetrySection,
    pub ig: IgSection,
}

/// Implementation Guide packages (`fhirmesh ig install|list|remove`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IgSection {
    /// Where installed packages are kept (`{name}#{version}.tgz`), loaded at start; unset:
    /// `{storage.data_dir}/ig`.
    pub dir: Option<PathBuf>,
}

/// OpenTelemetry traces.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySection {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`; empty: no spans
    /// are exported.
    pub otlp_endpoint: String,
    /// `service.name` of this process's spans; empty: `fhirmesh-<target>`.
    pub service_name: String,
}

/// How services call each other over gRPC (the gateway and the notifier calling the resource
/// service).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcSection {
    /// Each call's deadline, retries included (sent as `grpc-timeout`; enforced by both sides).
    pub request_timeout_ms: u64,
    /// Times a read-only call (read, vread, search, history) is tried again after its connection
    /// failed (e.g. a resource service restarting); writes never are.
    pub read_retries: u32,
    /// TLS between services, on with these three set (PEM files; all or none): the CA
    /// certificate(s) every peer's certificate is checked against, …
    pub tls_ca_file: Option<PathBuf>,
    /// … this service's certificate (chain), presented by its gRPC server and by its calls, …
    pub tls_cert_file: Option<PathBuf>,
    /// … and that certificate's private key. Read at start: a rotated certificate takes a restart.
    pub tls_key_file: Option<PathBuf>,
    /// gRPC servers accept only callers presenting a certificate of `tls_ca_file` (mTLS); false:
    /// TLS with the servers' certificates only.
    pub tls_client_auth: bool,
    /// The name checked in servers' certificates instead of each endpoint's host (e.g. one
    /// certificate for the whole mesh).
    pub tls_server_name: Option<String>,
}

impl Default for GrpcSection {
    fn default() -> Self {
        GrpcSection {
            request_timeout_ms: 60_000,
            read_retries: 2,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_auth: true,
            tls_server_name: None,
        }
    }
}

impl Config {
    /// Where IG packages are installed: `ig.dir`, else `{storage.data_dir}/ig`.
    pub fn ig_dir(&self) -> PathBuf {
        self.ig.dir.clone().unwrap_or_else(|| self.storage.data_dir.join("ig"))
    }
}

impl GrpcSection {
    /// `endpoint` (the value of the key `name`) when its scheme agrees with the TLS setting:
    /// with TLS every call goes over it (`https://`); without, `https://` cannot be called.
    pub fn endpoint<'a>(&self, name: &str, endpoint: &'a str) -> anyhow::Result<&'a str> {
        match (self.tls_ca_file.is_some(), endpoint.starts_with("https://")) {
            (true, false) => bail!("{name} must be an https:// URL when grpc.tls_* is set, got {endpoint:?}"),
            (false, true) => {
                bail!("{name} is https:// ({endpoint:?}): set grpc.tls_ca_file, tls_cert_file and tls_key_file")
            }
            _ => Ok(endpoint),
        }
    }
}

/// Raw `Binary` content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BinarySection {
    /// Raw content announced (`Content-Length`) up to this size is stored inline in the Binary
    /// (base64 `data`); larger or unannounced content is streamed to the blob store and the
    /// Binary points to it.
    pub inline_max_bytes: u64,
    /// Largest raw content accepted (413 beyond); at most 2147483647.
    pub max_bytes: u64,
    /// `--target binary`: where the Binary content gRPC API is served (the gateway's
    /// `gateway.binary_endpoint`).
    pub grpc_listen: String,
    /// 0: off. More: presigned mode (needs `blob.backend = "s3"`), as FHIR Works on AWS had it —
    /// a FHIR JSON create or update of a Binary without content answers a `presignedPutUrl` to
    /// upload the content to, reads answer a `presignedGetUrl`; both valid this many seconds.
    pub presigned_url_seconds: u64,
}

impl Default for BinarySection {
    fn default() -> Self {
        BinarySection {
            inline_max_bytes: 256 * 1024,
            max_bytes: 1024 * 1024 * 1024,
            grpc_listen: "127.0.0.1:50054".into(),
            presigned_url_seconds: 0,
        }
    }
}

/// Bulk Data `$export`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportSection {
    /// Serve `$export` and run export workers (in `fhirmesh serve`).
    pub enabled: bool,
    /// Export jobs one client (token `client_id`, else `sub`) may have running per tenant; one
    /// more is refused with 429.
    pub max_active_per_owner: usize,
    /// Export workers in this process (each works on one resource type of a job at a time); 0
    /// serves `$export` and leaves the work to workers elsewhere on the same job store.
    pub workers: usize,
    /// An output file is closed, and the next one started, past this many bytes.
    pub max_file_bytes: u64,
    /// Finished exports and their files are removed this long after they finished.
    pub output_expiry_seconds: u64,
    /// Chunks per job: 0 picks by store — one chunk per resource type on SQLite, 8 parallel scan
    /// segments (each over every type) on DynamoDB; more segments spread one job over more
    /// workers. SQLite supports 1 only.
    pub segments: u32,
    /// A worker's hold on a chunk; renewed every third of it. A worker that dies leaves its chunk
    /// to another after this long.
    pub lease_seconds: u64,
    /// Resources (SQLite) or items (DynamoDB) read per page of a snapshot.
    pub page_size: usize,
    /// `--target exporter`: where the export gRPC API is served (the gateway's
    /// `gateway.export_endpoint`).
    pub grpc_listen: String,
    /// The DynamoDB table of export jobs (default: `{dynamodb.table}-jobs`).
    pub job_table: Option<String>,
    /// 0: downloads go through fhirmesh with the caller's token. More: the manifest names
    /// presigned S3 URLs valid this many seconds (at most 604800), fetched without a token
    /// (`requiresAccessToken: false`); needs `blob.backend = "s3"`.
    pub presigned_download_seconds: u64,
}

impl Default for ExportSection {
    fn default() -> Self {
        ExportSection {
            enabled: true,
            max_active_per_owner: 3,
            workers: 2,
            max_file_bytes: 128 * 1024 * 1024,
            output_expiry_seconds: 24 * 3600,
            segments: 0,
            lease_seconds: 60,
            page_size: 1_000,
            grpc_listen: "127.0.0.1:50053".into(),
            job_table: None,
            presigned_download_seconds: 0,
        }
    }
}

/// The audit trail: one `fhirmesh::audit` log record per request always; AuditEvent resources
/// when asked (one write per request, in the request's tenant).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    pub store_events: bool,
}

/// How callers authenticate and what they may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `none` (the embedded default: every caller may do anything, announced at start-up and in
    /// the CapabilityStatement) or `jwt` (bearer JWTs verified against a JWKS).
    pub mode: AuthMode,
    /// `rbac` (groups, FHIR Works on AWS's model) or `smart` (SMART on FHIR scopes).
    pub authorization: AuthorizationModel,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Accepted `aud` values (one must match).
    pub audience: Vec<String>,
    /// Accepted signature algorithms (`RS256`, `ES256`, `PS256`, `RS384`, `ES384`, …; never
    /// `none` or HMAC).
    pub algorithms: Vec<String>,
    /// Clock skew allowed for `exp`, `nbf` and `iat`, in seconds.
    pub leeway_seconds: u64,
    /// The JWKS as a local file, or …
    pub jwks_file: Option<PathBuf>,
    /// … fetched from a URL (cached, refreshed, refetched on an unknown `kid`).
    pub jwks_url: Option<String>,
    /// How often a JWKS URL is refreshed, in seconds.
    pub jwks_refresh_seconds: u64,
    /// The claim holding RBAC groups.
    pub groups_claim: String,
    /// The claim holding the tenant (multi-tenancy).
    pub tenant_claim: String,
    /// RBAC rules (TOML, `[groups.<name>] interactions = […] resource_types = […]`); FHIR Works
    /// on AWS's practitioner / non-practitioner / auditor rules when unset.
    pub rbac_rules_file: Option<PathBuf>,
    /// The authorization server's endpoints, advertised in `/.well-known/smart-configuration`.
    pub smart_authorize_url: Option<String>,
    pub smart_token_url: Option<String>,
    /// Lets a mesh gateway (`--target gateway`) run with `mode = "none"`. Only for tests: a mesh
    /// deployment otherwise refuses to start without authentication.
    pub insecure_allow_none: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    None,
    Jwt,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorizationModel {
    #[default]
    Rbac,
    Smart,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::None,
            authorization: AuthorizationModel::Rbac,
            issuer: None,
            audience: Vec::new(),
            algorithms: vec!["RS256".into(), "ES256".into()],
            leeway_seconds: 60,
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_seconds: 300,
            groups_claim: "cognito:groups".into(),
            tenant_claim: "custom:tenantId".into(),
            rbac_rules_file: None,
            smart_authorize_url: None,
            smart_token_url: None,
            insecure_allow_none: false,
        }
    }
}

/// Multi-tenancy: off by default; when on, every FHIR route lives under `/tenant/{tenantId}/`
/// and, with auth, the token's tenant claim must name the same tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenancyConfig {
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// HTTP address of the FHIR API (gateway and embedded mode).
    pub listen: String,
    /// Path prefix of the FHIR base ("" = server root, or e.g. "/fhir").
    pub base_path: String,
    /// Absolute URL clients use, for Location headers and Bundle links; derived from Host if unset.
    pub public_base_url: Option<String>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest accepted transaction or batch Bundle (`POST /`), in bytes.
    pub max_bundle_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Where resources live: `sqlite` (embedded, under `data_dir`) or `dynamodb` (see
    /// `[dynamodb]` and `[aws]`). The search index stays under `data_dir` either way.
    pub backend: StorageBackend,
    /// Directory of the embedded SQLite database and search index.
    pub data_dir: PathBuf,
    /// fsync every commit (group-committed). Turn off only for throwaway data.
    pub durable: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    #[default]
    Sqlite,
    Dynamodb,
}

/// Where the search index lives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchSection {
    /// `sqlite`: embedded, `search.db` under `storage.data_dir` (one indexer process);
    /// `opensearch`: an OpenSearch 2.x cluster (see `[opensearch]`), shared by every process.
    pub backend: SearchBackend,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchBackend {
    #[default]
    Sqlite,
    Opensearch,
}

/// The OpenSearch search index (`search.backend = "opensearch"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenSearchSection {
    /// e.g. `http://127.0.0.1:9200` or `https://search-….es.amazonaws.com`.
    pub url: String,
    /// Every index name starts with it: `{prefix}-r-{type}`, `{prefix}-meta`.
    pub prefix: String,
}

impl Default for OpenSearchSection {
    fn default() -> Self {
        OpenSearchSection { url: "http://127.0.0.1:9200".into(), prefix: "fhirmesh".into() }
    }
}

/// Where the AWS services are: region and credentials come from the standard AWS chain
/// (environment, profile, web identity / IRSA, instance metadata) unless set here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsConfig {
    /// e.g. "us-east-1"; from the environment when unset.
    pub region: Option<String>,
    /// Endpoint override for every AWS service (moto, LocalStack, a VPC endpoint).
    pub endpoint_url: Option<String>,
}

/// The DynamoDB resource store (`storage.backend = "dynamodb"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoDbConfig {
    pub table: String,
    /// Create the table at start-up when it is missing (development and tests; production
    /// deployments run `fhirmesh provision` with broader permissions once).
    pub create_table: bool,
    /// How long a reserved but uncommitted change-log sequence stays open before readers void it.
    pub hole_timeout_ms: u64,
}

/// Where binaries and export files live: local files under `storage.data_dir/blobs`, or an S3
/// bucket (with `[aws]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlobConfig {
    pub backend: BlobBackend,
    /// The bucket (`backend = "s3"`).
    pub bucket: String,
    /// Prefix of every object key in the bucket (before the tenant), e.g. "fhirmesh/".
    pub key_prefix: String,
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig { backend: BlobBackend::Local, bucket: "fhirmesh-blobs".into(), key_prefix: String::new() }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobBackend {
    #[default]
    Local,
    S3,
}

/// Where the relay reads committed changes from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelaySection {
    /// `change_log`: the store's change log in sequence order (SQLite or DynamoDB); `streams`:
    /// DynamoDB Streams with shard leases, so several relays share the shards (DynamoDB only).
    pub source: RelaySource,
    /// The Streams relay's lease and checkpoint table; `{dynamodb.table}-leases` when unset.
    pub lease_table: Option<String>,
    /// This relay's name in the leases; `{HOSTNAME}-{pid}` when unset.
    pub worker_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelaySource {
    #[default]
    ChangeLog,
    Streams,
}

/// The event bus change events travel on between services.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// `in_process` (one process: `serve` without `--target`), `nats` (JetStream) or `sns_sqs`.
    pub backend: BusBackend,
    /// Create the streams/topics/queues at start-up when missing (development and tests; in
    /// production run `fhirmesh provision` once).
    pub provision: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusBackend {
    #[default]
    InProcess,
    Nats,
    SnsSqs,
}

/// NATS JetStream (`bus.backend = "nats"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSection {
    /// Server URL(s), comma-separated.
    pub url: String,
    pub stream: String,
    pub subject_prefix: String,
    pub dead_letter_stream: String,
    pub dead_letter_subject_prefix: String,
    /// Redelivery of an unacknowledged event after this many seconds.
    pub ack_wait_seconds: u64,
    /// Deliveries of one event before it goes to the dead-letter stream.
    pub max_deliver: i64,
}

impl Default for NatsSection {
    fn default() -> Self {
        let defaults = fhirmesh_bus::NatsConfig::default();
        NatsSection {
            url: defaults.url,
            stream: defaults.stream,
            subject_prefix: defaults.subject_prefix,
            dead_letter_stream: defaults.dead_letter_stream,
            dead_letter_subject_prefix: defaults.dead_letter_subject_prefix,
            ack_wait_seconds: defaults.ack_wait.as_secs(),
            max_deliver: defaults.max_deliver,
        }
    }
}

/// SNS + SQS (`bus.backend = "sns_sqs"`): one topic, one queue (+ dead-letter queue) per
/// consuming service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnsSqsSection {
    pub topic_name: String,
    pub queue_prefix: String,
    pub visibility_timeout_seconds: u64,
    /// Receives of one message before SQS moves it to the dead-letter queue.
    pub max_receive_count: u32,
}

impl Default for SnsSqsSection {
    fn default() -> Self {
        let defaults = fhirmesh_bus::SnsSqsConfig::default();
        SnsSqsSection {
            topic_name: defaults.topic_name,
            queue_prefix: defaults.queue_prefix,
            visibility_timeout_seconds: defaults.visibility_timeout.as_secs(),
            max_receive_count: defaults.max_receive_count,
        }
    }
}

impl Default for DynamoDbConfig {
    fn default() -> Self {
        DynamoDbConfig { table: "fhirmesh-resources".into(), create_table: false, hole_timeout_ms: 10_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceSection {
    /// gRPC address of the resource service (`--target resource`).
    pub grpc_listen: String,
    /// PUT to an unknown id creates the resource.
    pub update_create: bool,
    /// Page size of history and search when `_count` is absent.
    pub default_page_size: usize,
    /// Largest `_count` honoured.
    pub max_page_size: usize,
    /// Search page size when `_count` is absent.
    pub default_search_count: usize,
    /// How long a search waits for the index to apply the caller's latest write (read-your-writes).
    pub consistency_wait_ms: u64,
    /// A conditional delete matching several resources deletes them all (else 412).
    pub conditional_delete_multiple: bool,
    /// Most entries a transaction or batch Bundle may have (else 413, nothing written).
    pub max_bundle_entries: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySection {
    /// gRPC endpoint of the resource service (`--target gateway`).
    pub resource_endpoint: String,
    /// gRPC endpoint of the exporter (`--target gateway`); without one a mesh gateway does not
    /// serve `$export`.
    pub export_endpoint: Option<String>,
    /// gRPC endpoint of the binary service (`--target gateway`); without one a mesh gateway
    /// stores every raw Binary inline (within `server.max_body_bytes`).
    pub binary_endpoint: Option<String>,
}

/// Rest-hook Subscriptions: which endpoints may be called, limits, retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifierSection {
    /// Run the notifier (in `fhirmesh serve`); off, Subscriptions are stored but never delivered.
    pub enabled: bool,
    /// Endpoints allowed despite the policy (https only, public addresses only): host names
    /// (exact), IP addresses or CIDRs, e.g. `["127.0.0.1", "hooks.internal.example"]`.
    pub allow_endpoints: Vec<String>,
    /// Allow `http://` endpoints (still public addresses only, unless allow-listed).
    pub allow_insecure_http: bool,
    /// Most Subscriptions per tenant that are not `off` (a create or update past it: 422).
    pub max_active_per_tenant: usize,
    /// Attempts of one notification before it is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; doubling (with full jitter) up to `retry_max_delay_ms`.
    pub retry_base_ms: u64,
    pub retry_max_delay_ms: u64,
    /// Consecutive failed attempts before a Subscription's status becomes `error`.
    pub error_after_failures: u32,
    /// Timeout of one delivery request (connect + response).
    pub timeout_ms: u64,
    /// Notifications one Subscription may have waiting in a notifier; past it a new one is
    /// dead-lettered at once (a dead endpoint's backlog stays bounded).
    pub max_queued_per_subscription: usize,
    /// `--target notifier`: the resource service's gRPC endpoint.
    pub resource_endpoint: String,
}

impl Default for NotifierSection {
    fn default() -> Self {
        NotifierSection {
            enabled: true,
            allow_endpoints: Vec::new(),
            allow_insecure_http: false,
            max_active_per_tenant: 100,
            max_attempts: 10,
            retry_base_ms: 1_000,
            retry_max_delay_ms: 300_000,
            error_after_failures: 3,
            timeout_ms: 10_000,
            max_queued_per_subscription: 1_000,
            resource_endpoint: "http://127.0.0.1:50051".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "fhirmesh=debug,info" (RUST_LOG wins when set).
    pub level: String,
    /// `text` (human, the default) or `json` (one object per line, for log pipelines).
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// What every service serves its operators, and how it stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpsSection {
    /// Where `/healthz`, `/readyz` and `/metrics` are served by every target but the gateway and
    /// `all` (which serve them on `server.listen`).
    pub listen: String,
    /// On SIGTERM: `/readyz` answers 503 at once, and the process goes on serving this long
    /// before it stops accepting (time for a load balancer to take it out of rotation).
    pub drain_delay_seconds: u64,
    /// Then in-flight requests and event handling get this long to finish; past it the process
    /// exits anyway (with status 1). Keep it below Kubernetes' terminationGracePeriodSeconds
    /// minus the drain delay.
    pub shutdown_grace_seconds: u64,
}

impl Default for OpsSection {
    fn default() -> Self {
        OpsSection { listen: "127.0.0.1:9470".into(), drain_delay_seconds: 0, shutdown_grace_seconds: 30 }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            base_path: String::new(),
            public_base_url: None,
            max_body_bytes: 16 * 1024 * 1024,
            // Synthea writes a patient's whole record as one transaction of 30 MB and more.
            max_bundle_bytes: 128 * 1024 * 1024,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { backend: StorageBackend::Sqlite, data_dir: PathBuf::from("./data"), durable: true }
    }
}

impl Default for ResourceSection {
    fn default() -> Self {
        ResourceSection {
            grpc_listen: "127.0.0.1:50051".into(),
            update_create: true,
            default_page_size: 50,
            max_page_size: 1000,
            default_search_count: 20,
            consistency_wait_ms: 1000,
            conditional_delete_multiple: false,
            max_bundle_entries: 10_000,
        }
    }
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            resource_endpoint: "http://127.0.0.1:50051".into(),
            export_endpoint: None,
            binary_endpoint: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

/// Command-line values that override every other layer (only the ones given).
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub server: serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub storage: serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub resource: serde_json::Map<String, serde_json::Value>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub gateway: serde_json::Map<String, serde_json::Value>,
}

impl Config {
    /// Loads defaults, then `file` (if any), then `env` pairs (`FHIRMESH_SECTION__KEY=value`),
    /// then `overrides`; validates the result.
    pub fn load(file: Option<&Path>, env: Env, overrides: &Overrides) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                bail!("config file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        let config: Config = figment
            .merge(env)
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|err| anyhow::anyhow!("invalid configuration: {err}"))?;
        config.validate()?;
        Ok(config)
    }

    /// The process environment layer: `FHIRMESH_SERVER__LISTEN=…` sets `server.listen`.
    pub fn env() -> Env {
        Env::prefixed("FHIRMESH_").filter(|key| key.as_str().contains("__")).split("__")
    }

    fn validate_auth(&self) -> anyhow::Result<()> {
        let auth = &self.auth;
        if auth.mode == AuthMode::None {
            return Ok(());
        }
        if auth.issuer.as_deref().is_none_or(str::is_empty) {
            bail!("auth.issuer is required with auth.mode = \"jwt\"");
        }
        if auth.audience.is_empty() {
            bail!("auth.audience needs at least one accepted audience with auth.mode = \"jwt\"");
        }
        match (&auth.jwks_file, &auth.jwks_url) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => bail!("auth.mode = \"jwt\" needs exactly one of auth.jwks_file and auth.jwks_url"),
        }
        if let Some(url) = &auth.jwks_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("auth.jwks_url must be an http(s) URL, got {url:?}");
        }
        if auth.algorithms.is_empty() {
            bail!("auth.algorithms needs at least one algorithm");
        }
        Ok(())
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        parse_addr("server.listen", &self.server.listen)?;
        if self.storage.backend == StorageBackend::Dynamodb {
            if self.dynamodb.table.is_empty() {
                bail!("dynamodb.table must name a table");
            }
            if self.dynamodb.hole_timeout_ms < 1000 {
                bail!(
                    "dynamodb.hole_timeout_ms must be at least 1000 (longer than any commit), got {}",
                    self.dynamodb.hole_timeout_ms
                );
            }
        }
        if self.search.backend == SearchBackend::Opensearch {
            let url = &self.opensearch.url;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("opensearch.url must be an http(s) URL, got {url:?}");
            }
            let prefix = &self.opensearch.prefix;
            let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
            if prefix.is_empty() || !prefix.chars().all(valid) || prefix.starts_with(['-', '_']) {
                bail!(
                    "opensearch.prefix must be lower-case letters, digits, '-' and '_' (an index name), got {prefix:?}"
                );
            }
        }
        if self.relay.source == RelaySource::Streams && self.storage.backend != StorageBackend::Dynamodb {
            bail!("relay.source = \"streams\" reads DynamoDB Streams: it needs storage.backend = \"dynamodb\"");
        }
        if let Some(url) = &self.aws.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("aws.endpoint_url must be an http(s) URL, got {url:?}");
        }
        parse_addr("resource.grpc_listen", &self.resource.grpc_listen)?;
        let base = &self.server.base_path;
        if !base.is_empty() && (!base.starts_with('/') || base.ends_with('/') || base.contains("//")) {
            bail!("server.base_path must be empty or like \"/fhir\" (leading slash, no trailing slash), got {base:?}");
        }
        if let Some(url) = &self.server.public_base_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            bail!("server.public_base_url must be an absolute http(s) URL, got {url:?}");
        }
        if self.server.max_body_bytes < 1024 {
            bail!("server.max_body_bytes must be at least 1024, got {}", self.server.max_body_bytes);
        }
        if self.server.max_bundle_bytes < 1024 {
            bail!("server.max_bundle_bytes must be at least 1024, got {}", self.server.max_bundle_bytes);
        }
        if self.resource.max_bundle_entries == 0 {
            bail!("resource.max_bundle_entries must be at least 1");
        }
        if self.resource.default_page_size == 0 || self.resource.default_page_size > self.resource.max_page_size {
            bail!(
                "resource.default_page_size must be between 1 and resource.max_page_size ({}), got {}",
                self.resource.max_page_size,
                self.resource.default_page_size
            );
        }
        if self.resource.default_search_count == 0 || self.resource.default_search_count > self.resource.max_page_size {
            bail!(
                "resource.default_search_count must be between 1 and resource.max_page_size ({}), got {}",
                self.resource.max_page_size,
                self.resource.default_search_count
            );
        }
        if self.resource.consistency_wait_ms > 60_000 {
            bail!("resource.consistency_wait_ms must be at most 60000, got {}", self.resource.consistency_wait_ms);
        }
        self.validate_auth()?;
        fhirmesh_notify::EndpointPolicy::new(&self.notifier.allow_endpoints, self.notifier.allow_insecure_http)
            .map_err(|err| anyhow::anyhow!("notifier.allow_endpoints: {err}"))?;
        let export_endpoint = self.gateway.export_endpoint.as_ref();
        let binary_endpoint = self.gateway.binary_endpoint.as_ref();
        for (name, endpoint) in [
            ("gateway.resource_endpoint", Some(&self.gateway.resource_endpoint)),
            ("gateway.export_endpoint", export_endpoint),
            ("gateway.binary_endpoint", binary_endpoint),
            ("notifier.resource_endpoint", Some(&self.notifier.resource_endpoint)),
        ] {
            let Some(endpoint) = endpoint else { continue };
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                bail!("{name} must be an http(s) URL such as http://127.0.0.1:50051, got {endpoint:?}");
            }
        }
        let grpc = &self.grpc;
        match (&grpc.tls_ca_file, &grpc.tls_cert_file, &grpc.tls_key_file) {
            (None, None, None) | (Some(_), Some(_), Some(_)) => {}
            _ => bail!("grpc.tls_ca_file, grpc.tls_cert_file and grpc.tls_key_file are set together or not at all"),
        }
        parse_addr("ops.listen", &self.ops.listen)?;
        let endpoint = &self.telemetry.otlp_endpoint;
        if !(endpoint.is_empty() || endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            bail!(
                "telemetry.otlp_endpoint must be an http(s) URL such as http://127.0.0.1:4317, got {:?}",
                self.telemetry.otlp_endpoint
            );
        }
        if self.grpc.request_timeout_ms == 0 {
            bail!("grpc.request_timeout_ms must be at least 1");
        }
        if self.notifier.max_queued_per_subscription == 0 {
            bail!("notifier.max_queued_per_subscription must be at least 1");
        }
        if self.export.max_active_per_owner == 0 {
            bail!("export.max_active_per_owner must be at least 1");
        }
        if self.export.max_file_bytes < 1024 {
            bail!("export.max_file_bytes must be at least 1024, got {}", self.export.max_file_bytes);
        }
        if self.export.lease_seconds < 3 {
            bail!("export.lease_seconds must be at least 3, got {}", self.export.lease_seconds);
        }
        if !(1..=10_000).contains(&self.export.page_size) {
            bail!("export.page_size must be between 1 and 10000, got {}", self.export.page_size);
        }
        if self.binary.max_bytes == 0 || self.binary.max_bytes > fhirmesh_core::binary::MAX_CONTENT_BYTES {
            bail!(
                "binary.max_bytes must be between 1 and {}, got {}",
                fhirmesh_core::binary::MAX_CONTENT_BYTES,
                self.binary.max_bytes
            );
        }
        if self.binary.inline_max_bytes > self.binary.max_bytes {
            bail!(
                "binary.inline_max_bytes ({}) must not be larger than binary.max_bytes ({})",
                self.binary.inline_max_bytes,
                self.binary.max_bytes
            );
        }
        self.check_presign("export.presigned_download_seconds", self.export.presigned_download_seconds)?;
        self.check_presign("binary.presigned_url_seconds", self.binary.presigned_url_seconds)?;
        if self.export.segments > 1_000 {
            bail!("export.segments must be at most 1000, got {}", self.export.segments);
        }
        if self.export.segments > 1 && self.storage.backend == StorageBackend::Sqlite {
            bail!("export.segments must be 0 or 1 on SQLite (it reads exports by type), got {}", self.export.segments);
        }
        parse_addr("export.grpc_listen", &self.export.grpc_listen)?;
        parse_addr("binary.grpc_listen", &self.binary.grpc_listen)?;
        Ok(())
    }

    pub fn ops_addr(&self) -> SocketAddr {
        parse_addr("ops.listen", &self.ops.listen).unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9470)))
    }

    pub fn listen_addr(&self) -> SocketAddr {
        parse_addr("server.listen", &self.server.listen).unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    pub fn exporter_addr(&self) -> SocketAddr {
        parse_addr("export.grpc_listen", &self.export.grpc_listen)
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 50053)))
    }

    /// A presigned-URL validity `name` of `seconds` (0: off): S3 only, within S3's limit.
    fn check_presign(&self, name: &str, seconds: u64) -> anyhow::Result<()> {
        if seconds == 0 {
            return Ok(());
        }
        if self.blob.backend != BlobBackend::S3 {
            bail!("{name} needs blob.backend = \"s3\" (local files cannot be presigned)");
        }
        fhirmesh_core::blob::check_presign_expiry(std::time::Duration::from_secs(seconds))
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))
    }

    pub fn binary_addr(&self) -> SocketAddr {
        parse_addr("binary.grpc_listen", &self.binary.grpc_listen)
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 50054)))
    }

    /// The chunks per export job (`export.segments`, 0 resolved by store).
    pub fn export_segments(&self) -> u32 {
        match (self.export.segments, self.storage.backend) {
            (0, StorageBackend::Sqlite) => 1,
            (0, StorageBackend::Dynamodb) => 8,
            (n, _) => n,
        }
    }

    /// The DynamoDB table of export jobs.
    pub fn export_job_table(&self) -> String {
        self.export.job_table.clone().unwrap_or_else(|| format!("{}-jobs", self.dynamodb.table))
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        parse_addr("resource.grpc_listen", &self.resource.grpc_listen)
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 50051)))
    }
}

fn parse_addr(name: &str, value: &str) -> anyhow::Result<SocketAddr> {
    value.parse().with_context(|| format!("{name} must be an IP:port address such as 127.0.0.1:8080, got {value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment layer that reads nothing (a prefix no process sets).
    fn no_env() -> Env {
        Env::prefixed("FHIRMESH_UNIT_TEST_UNSET_").split("__")
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::load(None, no_env(), &Overrides::default()).expect("defaults load");
        assert_eq!(config, Config::default());
        assert_eq!(config.listen_addr().to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn file_then_overrides_layer_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("fhirmesh.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:9000\"\nbase_path = \"/fhir\"\n[storage]\ndurable = false\n",
        )
        .expect("write config");
        let mut overrides = Overrides::default();
        overrides.server.insert("listen".into(), "127.0.0.1:9100".into());
        let config = Config::load(Some(&file), no_env(), &overrides).expect("load");
        assert_eq!(config.server.listen, "127.0.0.1:9100", "flags win over the file");
        assert_eq!(config.server.base_path, "/fhir", "the file wins over defaults");
        assert!(!config.storage.durable);
    }

    #[test]
    fn grpc_tls_takes_all_three_files_and_https_endpoints() {
        let mut config = Config::default();
        config.grpc.tls_ca_file = Some(PathBuf::from("/etc/fhirmesh/ca.pem"));
        let err = config.validate().expect_err("a CA alone");
        assert!(err.to_string().contains("grpc.tls_cert_file"), "{err}");
        config.grpc.tls_cert_file = Some(PathBuf::from("/etc/fhirmesh/tls.crt"));
        config.grpc.tls_key_file = Some(PathBuf::from("/etc/fhirmesh/tls.key"));
        config.validate().expect("all three");

        let err = config.grpc.endpoint("gateway.resource_endpoint", "http://resource:50051").expect_err("clear");
        assert!(err.to_string().contains("gateway.resource_endpoint must be an https:// URL"), "{err}");
        assert_eq!(config.grpc.endpoint("x", "https://resource:50051").expect("https"), "https://resource:50051");
        let plain = Config::default();
        let err = plain.grpc.endpoint("notifier.resource_endpoint", "https://resource:50051").expect_err("no TLS");
        assert!(err.to_string().contains("set grpc.tls_ca_file"), "{err}");
        assert_eq!(plain.grpc.endpoint("x", "http://resource:50051").expect("http"), "http://resource:50051");
    }

    #[test]
    fn invalid_values_are_refused_with_the_key_named() {
        let mut overrides = Overrides::default();
        overrides.server.insert("listen".into(), "localhost-8080".into());
        let err = Config::load(None, no_env(), &overrides).expect_err("bad listen address");
        assert!(err.to_string().contains("server.listen"), "{err}");

        let mut overrides = Overrides::default();
        overrides.server.insert("base_path".into(), "fhir/".into());
        let err = Config::load(None, no_env(), &overrides).expect_err("bad base path");
        assert!(err.to_string().contains("server.base_path"), "{err}");
    }

    #[test]
    fn presigned_urls_need_s3_and_a_bounded_expiry() {
        type Set = fn(&mut Config, u64);
        let settings: [(&str, Set); 2] = [
            ("export.presigned_download_seconds", |c, s| c.export.presigned_download_seconds = s),
            ("binary.presigned_url_seconds", |c, s| c.binary.presigned_url_seconds = s),
        ];
        for (name, set) in settings {
            let mut config = Config::default();
            set(&mut config, 600);
            let err = config.validate().expect_err("local files cannot be presigned");
            assert!(err.to_string().contains(name), "{err}");
            config.blob.backend = BlobBackend::S3;
            config.validate().expect("S3 presigns");
            set(&mut config, 604_801);
            let err = config.validate().expect_err("beyond a week");
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn notifier_allow_endpoints_must_parse() {
        let mut config = Config::default();
        config.notifier.allow_endpoints =
            vec!["127.0.0.1".into(), "10.0.0.0/8".into(), "hooks.internal.example".into()];
        config.validate().expect("hosts, addresses and CIDRs are valid entries");
        config.notifier.allow_endpoints.push("https://hooks.example.com/x".into());
        let err = config.validate().expect_err("a URL is not an allow-list entry");
        assert!(err.to_string().contains("notifier.allow_endpoints"), "{err}");
        assert!(err.to_string().contains("https://hooks.example.com/x"), "{err}");
    }

    #[test]
    fn unknown_keys_in_a_file_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("fhirmesh.toml");
        std::fs::write(&file, "[server]\nlisten_on = \"127.0.0.1:9000\"\n").expect("write config");
        let err = Config::load(Some(&file), no_env(), &Overrides::default()).expect_err("unknown key");
        assert!(err.to_string().contains("listen_on"), "{err}");
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/fhirmesh.toml")), no_env(), &Overrides::default())
            .expect_err("missing file");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
