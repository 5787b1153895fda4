//! Composition: from a validated [`Config`] and a [`Target`] to running services.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fhirmesh_authn::{Algorithm, JwksSource, JwtConfig, Verifier};
use fhirmesh_bus::InProcessBus;
use fhirmesh_core::auth::{AccessPolicy, RbacRules, SmartOptions};
use fhirmesh_core::binary::Binaries;
use fhirmesh_core::capabilities::{Capabilities, Security};
use fhirmesh_core::ports::DynEventPublisher;
use fhirmesh_core::{DynResourceService, ResourceConfig};
use fhirmesh_gateway::{BinaryApi, ClaimNames, ExportApi, GatewayAuth, GatewayConfig};
use fhirmesh_notify::NotifierMetrics;
use fhirmesh_notify::runner::ChangeSource;
use fhirmesh_ops::Ops;
use fhirmesh_ops::grpc::GrpcTls;
use fhirmesh_proto::GrpcResourceClient;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{AuthConfig, AuthMode, AuthorizationModel, Config, RelaySource, StorageBackend};

/// Which part of the mesh this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Every service in one process: gateway, resource, relay, indexer and notifier (embedded
    /// SQLite and the in-process bus by default; any configured store and bus).
    All,
    /// The HTTP FHIR API, calling the resource service over gRPC (gateway.resource_endpoint).
    Gateway,
    /// The resource service over gRPC (resource.grpc_listen) on the embedded store.
    Resource,
    /// The indexer: follows the store's change log (and the bus, when one is configured) and
    /// keeps the search index equal to the store.
    Indexer,
    /// The relay: publishes the store's committed changes, in order, to the configured bus.
    Relay,
    /// The notifier: the `notifier` durable consumer on the configured bus (shared by every
    /// replica), calling the resource service over gRPC (notifier.resource_endpoint).
    Notifier,
    /// The exporter: the Bulk Data export API over gRPC (export.grpc_listen, the gateway's
    /// gateway.export_endpoint) and export workers, on the configured store, job store and blob
    /// store. Replicas share the jobs.
    Exporter,
    /// The binary service: Binary content on the blob store over gRPC (binary.grpc_listen, the
    /// gateway's gateway.binary_endpoint). Stateless; replicas share the bucket.
    Binary,
}

impl Target {
    /// The name given to `--target`.
    pub fn name(self) -> &'static str {
        match self {
            Target::All => "all",
            Target::Gateway => "gateway",
            Target::Resource => "resource",
            Target::Indexer => "indexer",
            Target::Relay => "relay",
            Target::Notifier => "notifier",
            Target::Exporter => "exporter",
            Target::Binary => "binary",
        }
    }

    /// Serves the FHIR API, and `/healthz`, `/readyz`, `/metrics` on its port; every other target
    /// serves those on `ops.listen`.
    fn serves_http(self) -> bool {
        matches!(self, Target::All | Target::Gateway)
    }
}

/// Services started by [`start`]; [`Running::stop`] shuts them down gracefully.
pub struct Running {
    /// Bound address of the FHIR HTTP API, when this process serves it.
    pub http_addr: Option<SocketAddr>,
    /// Bound address of the gRPC service of `--target resource` (the resource service),
    /// `--target exporter` (the export service) or `--target binary` (the binary service).
    pub grpc_addr: Option<SocketAddr>,
    /// Bound address of `/healthz`, `/readyz` and `/metrics` (`ops.listen`) of every target but
    /// `all` and `gateway` (which serve them on the HTTP API's).
    pub ops_addr: Option<SocketAddr>,
    /// Readiness checks and metrics of this process; [`Ops::drain`] turns readiness off.
    pub ops: Ops,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Signals every service to stop, then waits for them to drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.wait().await
    }

    /// Waits until every service has stopped (after a shutdown signal or a failure).
    pub async fn wait(self) -> anyhow::Result<()> {
        let mut first_error = None;
        for task in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    first_error.get_or_insert(err);
                }
                Err(join) => {
                    first_error.get_or_insert(anyhow::anyhow!("service task failed: {join}"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A future that resolves when [`Running::signal_stop`] is called.
    fn stopped(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Asks every service to stop without waiting.
    pub fn signal_stop(&self) {
        let _ = self.shutdown.send(true);
    }
}

fn resource_config(config: &Config, profiles: Option<Arc<fhirmesh_ig::Validator>>) -> ResourceConfig {
    // Subscriptions are validated on every write, also where this process delivers none (the
    // notifier disabled or elsewhere): what is stored is what a notifier may call. The allow-list
    // was checked by `Config::validate`; were it invalid anyway, the strict policy refuses more.
    let notifier = &config.notifier;
    let policy = fhirmesh_notify::EndpointPolicy::new(&notifier.allow_endpoints, notifier.allow_insecure_http)
        .unwrap_or_else(|_| fhirmesh_notify::EndpointPolicy::strict());
    let subscriptions = fhirmesh_notify::SubscriptionWriteRules::new(policy, notifier.max_active_per_tenant);
    ResourceConfig {
        update_create: config.resource.update_create,
        default_page_size: config.resource.default_page_size,
        max_page_size: config.resource.max_page_size,
        default_search_count: config.resource.default_search_count,
        consistency_wait: std::time::Duration::from_millis(config.resource.consistency_wait_ms),
        conditional_delete_multiple: config.resource.conditional_delete_multiple,
        max_bundle_entries: config.resource.max_bundle_entries,
        write_rules: Some(Arc::new(crate::ig::WriteRules::new(subscriptions, profiles))),
        ..ResourceConfig::default()
    }
}

async fn gateway_config(
    config: &Config,
    profiles: std::collections::BTreeMap<String, Vec<String>>,
    ops: Ops,
    exports: Option<ExportApi>,
    binaries: Option<BinaryApi>,
) -> anyhow::Result<GatewayConfig> {
    let auth = &config.auth;
    let (gateway_auth, security, smart_configuration) = match auth.mode {
        AuthMode::None => {
            tracing::warn!("auth.mode = none: NO AUTHENTICATION, every caller may read and write everything");
            (None, Security::None, None)
        }
        AuthMode::Jwt => {
            let verifier = Verifier::new(jwt_config(auth)?).await.context("cannot load the JWKS")?;
            let (policy, security, smart) = match auth.authorization {
                AuthorizationModel::Rbac => {
                    let rules = match &auth.rbac_rules_file {
                        Some(path) => load_rbac_rules(path)?,
                        None => RbacRules::fhir_works_defaults(),
                    };
                    (AccessPolicy::Rbac(rules), Security::Rbac, None)
                }
                AuthorizationModel::Smart => (
                    AccessPolicy::Smart(SmartOptions::default()),
                    Security::Smart {
                        authorize: auth.smart_authorize_url.clone(),
                        token: auth.smart_token_url.clone(),
                    },
                    Some(fhirmesh_core::capabilities::smart_configuration(
                        auth.issuer.as_deref(),
                        auth.smart_authorize_url.as_deref(),
                        auth.smart_token_url.as_deref(),
                        auth.jwks_url.as_deref(),
                    )),
                ),
            };
            let claims = ClaimNames { groups: auth.groups_claim.clone(), tenant: auth.tenant_claim.clone() };
            (Some(GatewayAuth { verifier, policy, claims }), security, smart)
        }
    };
    Ok(GatewayConfig {
        base_path: config.server.base_path.clone(),
        public_base_url: config.server.public_base_url.clone(),
        max_body_bytes: config.server.max_body_bytes,
        max_bundle_bytes: config.server.max_bundle_bytes,
        capabilities: Capabilities {
            software_name: "fhirmesh".into(),
            software_version: env!("CARGO_PKG_VERSION").into(),
            base_url: config.server.public_base_url.clone(),
            update_create: config.resource.update_create,
            conditional_delete_multiple: config.resource.conditional_delete_multiple,
            security,
            bulk_export: exports.is_some(),
            profiles,
        },
        auth: gateway_auth,
        smart_configuration,
        multi_tenant: config.tenancy.enabled,
        audit_events: config.audit.store_events,
        ops,
        exports,
        binaries,
    })
}

fn jwt_config(auth: &AuthConfig) -> anyhow::Result<JwtConfig> {
    let algorithms = auth
        .algorithms
        .iter()
        .map(|name| {
            name.parse::<Algorithm>().map_err(|_| anyhow::anyhow!("auth.algorithms: unknown algorithm {name:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let jwks = match (&auth.jwks_file, &auth.jwks_url) {
        (Some(path), _) => JwksSource::File(path.clone()),
        (None, Some(url)) => JwksSource::Url {
            url: url.clone(),
            refresh: Duration::from_secs(auth.jwks_refresh_seconds),
            min_refetch: Duration::from_secs(30),
        },
        (None, None) => bail!("auth.mode = \"jwt\" needs auth.jwks_file or auth.jwks_url"),
    };
    Ok(JwtConfig {
        issuer: auth.issuer.clone().unwrap_or_default(),
        audience: auth.audience.clone(),
        algorithms,
        leeway: Duration::from_secs(auth.leeway_seconds),
        jwks,
    })
}

fn load_rbac_rules(path: &std::path::Path) -> anyhow::Result<RbacRules> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let rules: RbacRules =
        toml::from_str(&text).with_context(|| format!("{} is not valid RBAC rules", path.display()))?;
    rules.validate().map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))?;
    Ok(rules)
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// Starts `target`'s services on the current runtime, bound to the configured addresses (port 0
/// picks a free port; read the bound ones from [`Running`]).
pub async fn start(config: &Config, target: Target) -> anyhow::Result<Running> {
    // Packages that cannot be read or do not fit together stop the start, every reason listed.
    // Their search parameters are installed before anything uses the search registry; their
    // profiles check the writes of resources that claim them.
    let packages = crate::ig::load(config)?;
    // Only the resource service (validating writes) and the gateway (listing them) use profiles.
    let profiles = if matches!(target, Target::All | Target::Resource | Target::Gateway) {
        crate::ig::profiles(&packages)
    } else {
        None
    };
    fhirmesh_fhir::validate::warm_up();
    let (shutdown, rx) = watch::channel(false);
    let mut tasks: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
    let mut http_addr = None;
    let mut grpc_addr = None;
    let mut ops_addr = None;
    let ops = Ops::new(target.name());
    let mut exports_api = None;
    let mut binaries_api = None;
    let tls = grpc_tls(config)?;

    let service: Option<DynResourceService> = match target {
        Target::All | Target::Resource | Target::Indexer | Target::Relay => {
            let aws = crate::stores::Aws::new(&config.aws);
            let mut stores = crate::stores::open(config, &aws).await?;
            stores.store = crate::metered::store(stores.store, &ops);
            check_store(&ops, &stores.changes);
            let bus = match target {
                Target::All | Target::Relay | Target::Indexer => crate::buses::open(config, &aws).await?,
                _ => None,
            };
            // Embedded (`All` on the in-process bus): relay → bus → indexer in this process.
            let in_process = (target == Target::All && bus.is_none()).then(|| Arc::new(InProcessBus::new(4096)));
            let mut events = None;
            if matches!(target, Target::All | Target::Indexer) {
                events = match (&bus, &in_process) {
                    (Some(bus), _) => {
                        let consumer = bus.consumer("indexer").await?;
                        register_bus_lag(&ops, "indexer", consumer.clone());
                        Some(fhirmesh_bus::durable_subscription(consumer))
                    }
                    (None, Some(in_process)) => Some(in_process.subscription()),
                    // A lone indexer without a bus polls the change log.
                    (None, None) => None,
                };
            }
            if matches!(target, Target::All | Target::Relay) {
                let publisher: DynEventPublisher = match (&bus, in_process) {
                    (Some(bus), _) => bus.publisher(),
                    (None, Some(in_process)) => in_process,
                    (None, None) => {
                        bail!("--target relay publishes to an external bus: set bus.backend = \"nats\" or \"sns_sqs\"")
                    }
                };
                // Each resumes from its durable position (the relay's checkpoint in the store, or
                // its per-shard checkpoints in the lease table).
                let stopped = Running::stopped(&rx);
                let relay = match config.relay.source {
                    RelaySource::ChangeLog => fhirmesh_relay::spawn(stores.changes.clone(), publisher, stopped),
                    RelaySource::Streams => {
                        let relay = crate::stores::stream_relay(config, &aws).await?;
                        tokio::spawn(relay.run(publisher, stopped))
                    }
                };
                tasks.push(tokio::spawn(async move { relay.await.context("relay task failed") }));
            }
            if target == Target::Relay {
                None
            } else {
                let index = crate::metered::index(crate::stores::open_index(config).await?, &ops);
                check_index(&ops, &index);
                if matches!(target, Target::All | Target::Indexer) {
                    // SQLite's latest sequence is known to the process that writes it only.
                    if target == Target::Indexer && config.storage.backend == StorageBackend::Dynamodb {
                        register_index_lag(&ops, &stores.changes, &index);
                    }
                    let indexer =
                        fhirmesh_indexer::spawn(index.clone(), stores.changes.clone(), events, Running::stopped(&rx));
                    tasks.push(tokio::spawn(async move { indexer.await.context("indexer task failed") }));
                }
                let service = (target != Target::Indexer).then(|| {
                    fhirmesh_resource::resource_service(
                        stores.store.clone(),
                        stores.changes.clone(),
                        index,
                        resource_config(config, profiles.clone()),
                    ) as DynResourceService
                });
                if let (Target::All, Some(service)) = (target, &service)
                    && config.notifier.enabled
                {
                    let metrics = NotifierMetrics::new();
                    let source = ChangeSource::ChangeLog(stores.changes.clone());
                    register_notifier(&ops, &metrics);
                    tasks.push(spawn_notifier(config, service.clone(), source, metrics, &rx)?);
                }
                if target == Target::All {
                    let blobs = crate::stores::open_blobs(config, &aws).await?;
                    check_blobs(&ops, &blobs);
                    binaries_api = Some(binary_api(config, Arc::new(Binaries::new(blobs.clone()))));
                    if let Some(source) = &stores.export
                        && config.export.enabled
                    {
                        let jobs = crate::stores::open_jobs(config, &aws).await?;
                        check_jobs(&ops, &jobs);
                        let (api, workers) = exports(config, &stores, source.clone(), jobs, blobs, &ops, &rx);
                        exports_api = Some(ExportApi(api));
                        tasks.extend(workers);
                    }
                }
                service
            }
        }
        Target::Notifier => {
            let aws = crate::stores::Aws::new(&config.aws);
            let Some(bus) = crate::buses::open(config, &aws).await? else {
                bail!("--target notifier consumes an external bus: set bus.backend = \"nats\" or \"sns_sqs\"");
            };
            let consumer = bus.consumer(fhirmesh_notify::runner::CONSUMER).await?;
            register_bus_lag(&ops, fhirmesh_notify::runner::CONSUMER, consumer.clone());
            let heartbeat = match config.bus.backend {
                crate::config::BusBackend::SnsSqs => config.sns_sqs.visibility_timeout_seconds,
                _ => config.nats.ack_wait_seconds,
            };
            let heartbeat = Duration::from_secs(heartbeat).div_f64(3.0).max(Duration::from_millis(500));
            let endpoint = &config.notifier.resource_endpoint;
            let upstream = Upstream::new(config, &tls, "notifier.resource_endpoint", endpoint)?;
            let service: DynResourceService = Arc::new(
                GrpcResourceClient::connect_with(endpoint.clone(), upstream.client())
                    .with_context(|| format!("invalid notifier.resource_endpoint {endpoint}"))?
                    .with_policy(call_policy(config)),
            );
            let metrics = NotifierMetrics::new();
            register_notifier(&ops, &metrics);
            upstream.check(&ops, "resource service", "fhirmesh.v1.ResourceService")?;
            let source = ChangeSource::Bus { consumer, heartbeat };
            tasks.push(spawn_notifier(config, service, source, metrics, &rx)?);
            None
        }
        Target::Exporter => {
            let aws = crate::stores::Aws::new(&config.aws);
            let stores = crate::stores::open(config, &aws).await?;
            check_store(&ops, &stores.changes);
            let Some(source) = stores.export.clone() else {
                bail!("the configured store cannot be exported");
            };
            let blobs = crate::stores::open_blobs(config, &aws).await?;
            check_blobs(&ops, &blobs);
            let jobs = crate::stores::open_jobs(config, &aws).await?;
            check_jobs(&ops, &jobs);
            let (service, workers) = exports(config, &stores, source, jobs, blobs, &ops, &rx);
            tasks.extend(workers);
            let listener = bind(config.exporter_addr(), "the export gRPC service").await?;
            grpc_addr = Some(listener.local_addr()?);
            let (ops, stopped, tls) = (ops.clone(), Running::stopped(&rx), tls.clone());
            tasks.push(tokio::spawn(async move {
                fhirmesh_exporter::serve_grpc(listener, service, &ops, tls.as_ref(), stopped).await
            }));
            None
        }
        Target::Binary => {
            let aws = crate::stores::Aws::new(&config.aws);
            let blobs = crate::stores::open_blobs(config, &aws).await?;
            check_blobs(&ops, &blobs);
            let listener = bind(config.binary_addr(), "the binary gRPC service").await?;
            grpc_addr = Some(listener.local_addr()?);
            let service = Arc::new(Binaries::new(blobs));
            let (ops, stopped, tls) = (ops.clone(), Running::stopped(&rx), tls.clone());
            tasks.push(tokio::spawn(async move {
                fhirmesh_binary::serve_grpc(listener, service, &ops, tls.as_ref(), stopped).await
            }));
            None
        }
        Target::Gateway => {
            if config.auth.mode == AuthMode::None && !config.auth.insecure_allow_none {
                bail!(
                    "a mesh gateway requires authentication: set auth.mode = \"jwt\" (auth.insecure_allow_none = true \
                     runs it open, for tests only)"
                );
            }
            if let Some(endpoint) = &config.gateway.export_endpoint
                && config.export.enabled
            {
                let upstream = Upstream::new(config, &tls, "gateway.export_endpoint", endpoint)?;
                let client = fhirmesh_proto::GrpcExportClient::connect_with(endpoint.clone(), upstream.client())
                    .with_context(|| format!("invalid gateway.export_endpoint {endpoint}"))?;
                upstream.check(&ops, "export service", "fhirmesh.v1.ExportService")?;
                exports_api = Some(ExportApi(Arc::new(client)));
            }
            if let Some(endpoint) = &config.gateway.binary_endpoint {
                let upstream = Upstream::new(config, &tls, "gateway.binary_endpoint", endpoint)?;
                let client = fhirmesh_proto::GrpcBinaryClient::connect_with(endpoint.clone(), upstream.client())
                    .with_context(|| format!("invalid gateway.binary_endpoint {endpoint}"))?;
                upstream.check(&ops, "binary service", "fhirmesh.v1.BinaryService")?;
                binaries_api = Some(binary_api(config, Arc::new(client)));
            }
            None
        }
    };

    if target == Target::Resource {
        let listener = bind(config.grpc_addr(), "gRPC").await?;
        grpc_addr = Some(listener.local_addr()?);
        let service = service.clone().context("resource target has a service")?;
        let (ops, stopped, tls) = (ops.clone(), Running::stopped(&rx), tls.clone());
        tasks.push(tokio::spawn(async move {
            fhirmesh_resource::serve_grpc(listener, service, &ops, tls.as_ref(), stopped).await
        }));
    }

    if matches!(target, Target::All | Target::Gateway) {
        let service: DynResourceService = match service {
            Some(local) => local,
            None => {
                let endpoint = &config.gateway.resource_endpoint;
                let upstream = Upstream::new(config, &tls, "gateway.resource_endpoint", endpoint)?;
                upstream.check(&ops, "resource service", "fhirmesh.v1.ResourceService")?;
                Arc::new(
                    GrpcResourceClient::connect_with(endpoint.clone(), upstream.client())
                        .with_context(|| format!("invalid resource endpoint {endpoint}"))?
                        .with_policy(call_policy(config)),
                )
            }
        };
        let listener = bind(config.listen_addr(), "HTTP").await?;
        http_addr = Some(listener.local_addr()?);
        let router = fhirmesh_gateway::router(
            service,
            gateway_config(
                config,
                profiles.as_ref().map(|p| p.profiles_by_type()).unwrap_or_default(),
                ops.clone(),
                exports_api,
                binaries_api,
            )
            .await?,
        );
        let stopped = Running::stopped(&rx);
        tasks.push(tokio::spawn(async move {
            fhirmesh_gateway::serve(listener, router, stopped).await.context("HTTP server failed")
        }));
    }

    if !target.serves_http() {
        let listener = bind(config.ops_addr(), "health and metrics (ops.listen)").await?;
        ops_addr = Some(listener.local_addr()?);
        let (ops, stopped) = (ops.clone(), Running::stopped(&rx));
        tasks.push(tokio::spawn(async move {
            fhirmesh_ops::serve(listener, ops, stopped).await.context("health and metrics server failed")
        }));
    }

    if target == Target::Indexer {
        tracing::info!("indexer following the change log");
    }
    Ok(Running { http_addr, grpc_addr, ops_addr, ops, shutdown, tasks })
}

/// Ready while the store answers (the latest change sequence: a read every store serves).
fn check_store(ops: &Ops, changes: &fhirmesh_core::ports::DynChangeLog) {
    let changes = changes.clone();
    ops.check("store", move || {
        let changes = changes.clone();
        async move { changes.latest_sequence().await.map(|_| ()).map_err(|e| e.to_string()) }
    });
}

/// Ready while the search index answers (its watermark).
/// `fhirmesh_bus_consumer_lag_messages{consumer}`: the events waiting for this service's durable
/// consumer, asked of the bus at each scrape (absent when the bus does not answer in time).
fn register_bus_lag(ops: &Ops, name: &'static str, consumer: fhirmesh_core::ports::DynEventConsumer) {
    ops.metrics_async(move || {
        let consumer = consumer.clone();
        async move {
            let backlog = tokio::time::timeout(fhirmesh_ops::CHECK_TIMEOUT, consumer.backlog()).await;
            let mut out = String::new();
            bus_lag_gauge(&mut out, name, backlog.ok().and_then(Result::ok).flatten());
            out
        }
    });
}

fn bus_lag_gauge(out: &mut String, consumer: &str, backlog: Option<u64>) {
    if let Some(backlog) = backlog {
        out.push_str(&format!(
            "# HELP fhirmesh_bus_consumer_lag_messages Events published and not yet acknowledged by this durable consumer.\n\
             # TYPE fhirmesh_bus_consumer_lag_messages gauge\n\
             fhirmesh_bus_consumer_lag_messages{{consumer=\"{consumer}\"}} {backlog}\n"
        ));
    }
}

fn check_index(ops: &Ops, index: &fhirmesh_core::ports::DynSearchIndex) {
    let index = index.clone();
    ops.check("search index", move || {
        let index = index.clone();
        async move { index.watermark().await.map(|_| ()).map_err(|e| e.to_string()) }
    });
}

/// Ready while the blob store answers (a metadata read of a key that need not exist).
fn check_blobs(ops: &Ops, blobs: &fhirmesh_core::blob::DynBlobStore) {
    let blobs = blobs.clone();
    ops.check("blob store", move || {
        let blobs = blobs.clone();
        async move {
            let key = fhirmesh_core::blob::BlobKey::new(&fhirmesh_core::model::TenantId::default_tenant(), "readyz")
                .map_err(|e| e.to_string())?;
            blobs.head(&key).await.map(|_| ()).map_err(|e| e.to_string())
        }
    });
}

/// Ready while the export job store answers (a read of a job that need not exist).
fn check_jobs(ops: &Ops, jobs: &fhirmesh_core::export::DynJobStore) {
    let jobs = jobs.clone();
    ops.check("export jobs", move || {
        let jobs = jobs.clone();
        async move {
            let id = fhirmesh_core::export::JobId::parse("readyz").ok_or("no probe job id")?;
            let tenant = fhirmesh_core::model::TenantId::default_tenant();
            jobs.get(&tenant, &id).await.map(|_| ()).map_err(|e| e.to_string())
        }
    });
}

/// A gRPC server this service calls: its endpoint, checked against the TLS setting, and the TLS
/// to call it with.
struct Upstream<'a> {
    endpoint: &'a str,
    tls: &'a Option<GrpcTls>,
}

impl<'a> Upstream<'a> {
    /// `endpoint`, the value of the key `name` (`https://` exactly when `[grpc] tls_*` is set).
    fn new(config: &Config, tls: &'a Option<GrpcTls>, name: &str, endpoint: &'a str) -> anyhow::Result<Upstream<'a>> {
        Ok(Upstream { endpoint: config.grpc.endpoint(name, endpoint)?, tls })
    }

    /// The client side of the TLS, when on.
    fn client(&self) -> Option<fhirmesh_ops::grpc::ClientTlsConfig> {
        self.tls.as_ref().map(GrpcTls::client)
    }

    /// Ready while the server reports `service` SERVING (`grpc.health.v1`), as `name`.
    fn check(&self, ops: &Ops, name: &str, service: &str) -> anyhow::Result<()> {
        let probe = fhirmesh_ops::grpc::health_check_endpoint(self.endpoint, service, self.tls.as_ref())
            .map_err(anyhow::Error::msg)?;
        ops.check(name, probe);
        Ok(())
    }
}

/// The search index lag on `/metrics`, read from the store and the index themselves.
fn register_index_lag(
    ops: &Ops,
    changes: &fhirmesh_core::ports::DynChangeLog,
    index: &fhirmesh_core::ports::DynSearchIndex,
) {
    let (changes, index) = (changes.clone(), index.clone());
    ops.metrics_async(move || {
        let (changes, index) = (changes.clone(), index.clone());
        async move {
            let mut out = String::new();
            match (changes.latest_sequence().await, index.watermark().await) {
                (Ok(latest), Ok(watermark)) => fhirmesh_ops::search_index_gauges(&mut out, latest, watermark),
                (Err(error), _) => tracing::warn!(%error, "store unavailable for /metrics"),
                (_, Err(error)) => tracing::warn!(%error, "search index unavailable for /metrics"),
            }
            out
        }
    });
}

/// The notifier's metrics on `/metrics`, and its reads of changes in readiness.
fn register_notifier(ops: &Ops, metrics: &NotifierMetrics) {
    let rendered = metrics.clone();
    ops.metrics(move |out| rendered.render(out));
    let metrics = metrics.clone();
    ops.check("change feed", move || {
        let ready = metrics.is_ready();
        async move { if ready { Ok(()) } else { Err("the notifier cannot read changes".to_owned()) } }
    });
}

/// `[grpc] tls_*`: TLS between services, when set (files read and checked now).
fn grpc_tls(config: &Config) -> anyhow::Result<Option<GrpcTls>> {
    let grpc = &config.grpc;
    let (Some(ca), Some(cert), Some(key)) = (&grpc.tls_ca_file, &grpc.tls_cert_file, &grpc.tls_key_file) else {
        return Ok(None);
    };
    GrpcTls::load(ca, cert, key, grpc.tls_client_auth, grpc.tls_server_name.clone())
        .context("grpc.tls_* cannot be used")
        .map(Some)
}

/// `[grpc]`: how the gateway and the notifier call the resource service.
fn call_policy(config: &Config) -> fhirmesh_proto::CallPolicy {
    fhirmesh_proto::CallPolicy {
        timeout: Duration::from_millis(config.grpc.request_timeout_ms),
        read_retries: config.grpc.read_retries,
    }
}

/// `service` with the sizes of `[binary]`, for the gateway.
fn binary_api(config: &Config, service: fhirmesh_core::binary::DynBinaryService) -> BinaryApi {
    BinaryApi {
        service,
        inline_max_bytes: config.binary.inline_max_bytes,
        max_bytes: config.binary.max_bytes,
        presign_expiry: (config.binary.presigned_url_seconds > 0)
            .then(|| Duration::from_secs(config.binary.presigned_url_seconds)),
    }
}

/// The export service of `[export]` over `jobs`, and its workers.
fn exports(
    config: &Config,
    stores: &crate::stores::Stores,
    source: fhirmesh_core::export::DynExportSource,
    jobs: fhirmesh_core::export::DynJobStore,
    blobs: fhirmesh_core::blob::DynBlobStore,
    ops: &Ops,
    rx: &watch::Receiver<bool>,
) -> (fhirmesh_core::export::DynExportService, Vec<JoinHandle<anyhow::Result<()>>>) {
    use fhirmesh_core::export::{ExportSettings, ExportWorker, Exports, WorkerSettings};
    let section = &config.export;
    let settings = ExportSettings {
        max_active_per_owner: section.max_active_per_owner,
        requires_access_token: config.auth.mode != AuthMode::None,
        segments: config.export_segments(),
        presign_expiry: (section.presigned_download_seconds > 0)
            .then(|| Duration::from_secs(section.presigned_download_seconds)),
    };
    let service = Exports::new(jobs.clone(), stores.changes.clone(), stores.store.clone(), blobs.clone(), settings);
    let wake = service.wake();
    let counters = Arc::new(fhirmesh_core::export::ExportCounters::default());
    let rendered = counters.clone();
    ops.metrics(move |out| rendered.render(out));
    let workers = (0..section.workers)
        .map(|_| {
            let settings = WorkerSettings {
                max_file_bytes: section.max_file_bytes,
                output_expiry: Duration::from_secs(section.output_expiry_seconds),
                lease: Duration::from_secs(section.lease_seconds),
                page_size: section.page_size,
                ..WorkerSettings::default()
            };
            let worker = ExportWorker::new(jobs.clone(), source.clone(), blobs.clone(), settings)
                .with_wake(wake.clone())
                .with_counters(counters.clone());
            let stopped = Running::stopped(rx);
            tokio::spawn(async move {
                worker.run(stopped).await;
                Ok(())
            })
        })
        .collect();
    (Arc::new(service), workers)
}

/// Starts the notifier on `source`, delivering with `[notifier]`'s settings.
fn spawn_notifier(
    config: &Config,
    service: DynResourceService,
    source: ChangeSource,
    metrics: NotifierMetrics,
    rx: &watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let notifier = fhirmesh_notifier::spawn(
        service,
        source,
        notifier_settings(config)?,
        Duration::from_millis(config.notifier.timeout_ms),
        config.storage.data_dir.join("dead-letters.ndjson"),
        metrics,
        Running::stopped(rx),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(tokio::spawn(async move { notifier.await.context("notifier task failed") }))
}

/// The notifier's settings from `[notifier]`.
fn notifier_settings(config: &Config) -> anyhow::Result<fhirmesh_notify::runner::NotifierSettings> {
    let section = &config.notifier;
    let policy = fhirmesh_notify::EndpointPolicy::new(&section.allow_endpoints, section.allow_insecure_http)
        .map_err(|e| anyhow::anyhow!("notifier.allow_endpoints: {e}"))?;
    let retry = fhirmesh_notify::RetryPolicy::new(
        Duration::from_millis(section.retry_base_ms),
        Duration::from_millis(section.retry_max_delay_ms),
        section.max_attempts,
    );
    Ok(fhirmesh_notify::runner::NotifierSettings {
        policy,
        retry,
        error_after_failures: section.error_after_failures,
        max_queued_per_subscription: section.max_queued_per_subscription,
        ..fhirmesh_notify::runner::NotifierSettings::default()
    })
}

/// Runs `target` until SIGINT/SIGTERM, printing the bound addresses on stdout; then drains
/// (see [`drain`]).
pub fn run(config: Config, target: Target) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(async move {
        let telemetry = init_tracing(&config, target)?;
        let result = serve_until_signal(&config, target).await;
        telemetry.shutdown();
        result
    })
}

async fn serve_until_signal(config: &Config, target: Target) -> anyhow::Result<()> {
    let running = start(config, target).await?;
    if let Some(addr) = running.ops_addr {
        tracing::info!(%addr, "health and metrics listening");
        println!("fhirmesh: health and metrics (/healthz, /readyz, /metrics) on http://{addr}");
    }
    if let Some(addr) = running.http_addr {
        tracing::info!(%addr, "fhir api listening");
        println!("fhirmesh: FHIR API listening on http://{addr}{}", config.server.base_path);
        if config.auth.mode == AuthMode::None {
            println!(
                "fhirmesh: WARNING: auth.mode = none — NO AUTHENTICATION, anyone who can reach this port may \
                 read and write everything (fine on a laptop; set [auth] mode = \"jwt\" anywhere else)"
            );
        }
    }
    if let Some(addr) = running.grpc_addr {
        let what = match target {
            Target::Exporter => "export",
            Target::Binary => "binary",
            _ => "resource",
        };
        tracing::info!(%addr, service = what, "grpc service listening");
        println!("fhirmesh: gRPC {what} service listening on {addr}");
    }
    if target == Target::Indexer {
        println!("fhirmesh: indexer running on {}", config.storage.data_dir.display());
    }
    if target == Target::Relay {
        println!("fhirmesh: relay publishing changes to the {:?} bus", config.bus.backend);
    }
    if target == Target::Notifier {
        println!("fhirmesh: notifier consuming the {:?} bus", config.bus.backend);
    }
    shutdown_signal().await;
    drain(running, &config.ops).await
}

/// Shuts down gracefully: readiness off at once, serving on for `drain_delay_seconds` (a load
/// balancer notices), then every service stops accepting and finishes what it has in flight
/// (requests answered, events handled and acknowledged) within `shutdown_grace_seconds`; past
/// that the process gives up on them (an unacknowledged event is redelivered elsewhere).
pub async fn drain(running: Running, ops: &crate::config::OpsSection) -> anyhow::Result<()> {
    running.ops.drain();
    let delay = Duration::from_secs(ops.drain_delay_seconds);
    tracing::info!(delay_seconds = ops.drain_delay_seconds, "shutdown signal: readiness off, draining");
    tokio::time::sleep(delay).await;
    let grace = Duration::from_secs(ops.shutdown_grace_seconds);
    tracing::info!(grace_seconds = ops.shutdown_grace_seconds, "stopping: finishing in-flight work");
    match tokio::time::timeout(grace, running.stop()).await {
        Ok(result) => {
            tracing::info!("stopped");
            result
        }
        Err(_) => bail!("in-flight work did not finish within ops.shutdown_grace_seconds ({grace:?}); exiting anyway"),
    }
}

/// Log lines as `[log]` says (JSON: one object per line with the current span's fields, the
/// trace id among them when spans are exported) and spans to `[telemetry]`'s collector.
fn init_tracing(config: &Config, target: Target) -> anyhow::Result<fhirmesh_ops::trace::Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let telemetry = &config.telemetry;
    let otlp = (!telemetry.otlp_endpoint.is_empty()).then(|| fhirmesh_ops::trace::Otlp {
        endpoint: telemetry.otlp_endpoint.clone(),
        service_name: if telemetry.service_name.is_empty() {
            format!("fhirmesh-{}", target.name())
        } else {
            telemetry.service_name.clone()
        },
    });
    let json = config.log.format == crate::config::LogFormat::Json;
    fhirmesh_core::trace::install(fhirmesh_core::trace::Propagation {
        set_parent: fhirmesh_ops::trace::set_parent,
        traceparent_of: fhirmesh_ops::trace::traceparent_of,
    });
    fhirmesh_ops::trace::install(filter, json, otlp).map_err(anyhow::Error::msg)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bus_lag_is_a_gauge_per_consumer_and_absent_when_unknown() {
        let mut out = String::new();
        bus_lag_gauge(&mut out, "indexer", Some(7));
        assert!(out.contains("# TYPE fhirmesh_bus_consumer_lag_messages gauge\n"), "{out}");
        assert!(out.ends_with("fhirmesh_bus_consumer_lag_messages{consumer=\"indexer\"} 7\n"), "{out}");
        let mut out = String::new();
        bus_lag_gauge(&mut out, "indexer", None);
        assert_eq!(out, "");
    }
}
