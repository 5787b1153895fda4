//! The notifier loop around the pure parts of this crate: it reads changes from its
//! [`ChangeSource`], keeps the [`Matcher`] equal to the tenants' Subscriptions, matches every
//! change, and hands each notification to the queue of its subscription, where a worker sends it
//! ([`Deliver`]), retries it with the [`RetryPolicy`], dead-letters it after the last attempt
//! ([`DeadLetters`]) and writes the status transitions of [`HealthTracker`] back to the
//! Subscription through the resource service.
//!
//! Two sources, one loop body:
//! - [`ChangeSource::ChangeLog`] (`fhirmesh serve`): the store's change log from the notifier's
//!   own checkpoint. The checkpoint moves only past changes whose notifications are all done.
//! - [`ChangeSource::Bus`] (`--target notifier`, any number of replicas): the notifier's durable
//!   consumer on the bus, shared by the replicas, so each change is handled by one of them. A
//!   change is acknowledged once all its notifications are done; until then the replica holding
//!   it tells the bus it is still in progress every `heartbeat`. A replica that dies holds no
//!   acknowledgement: the bus delivers its changes again, to another replica, after its ack wait.
//!
//! - **Isolation**: one queue and one worker per subscription: a slow or dead endpoint delays only
//!   its own notifications (in order), never another subscription's. A queue holds at most
//!   `max_queued_per_subscription` notifications; past that a new one is dead-lettered at once
//!   (`overflowed`). While a subscription is in `error` its queue holds one notification, the
//!   probe, retried with back-off: older waiting ones and newer arrivals are dead-lettered
//!   unattempted, and the first success makes it `active` with a full queue again. So a dead
//!   endpoint's backlog stays bounded — in memory, and in the bus's unacknowledged changes (the
//!   NATS consumer's `max_ack_pending`, shared by all subscriptions).
//! - **Nothing lost**: a change counts as done only when each of its notifications was delivered
//!   or dead-lettered. A notifier stopped mid-stream sends again what was in flight:
//!   at-least-once, receivers de-duplicate on the event id header.
//! - **Registry**: from the change log, a tenant's Subscriptions are loaded by a search
//!   (consistent with the change being matched: the search waits until the index has applied it)
//!   the first time a change of that tenant arrives, then kept current from the Subscription
//!   changes in the log, in order — so a Subscription applies to every change committed after it.
//!   From the bus, a replica sees only its share of the Subscription changes, so it reloads the
//!   Subscriptions of every tenant in a batch by a search consistent with the newest change of
//!   that tenant in the batch: a Subscription applies to the changes committed after it (and, at
//!   worst, to those of the same batch committed just before it).
//! - **Lifecycle**: `requested` → `active` as soon as it is loaded; `error` after
//!   `error_after_failures` failed attempts in a row and back to `active` on the next success;
//!   `off` when `end` has passed. Written with `If-Match`: a client's concurrent update wins.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fhirmesh_core::ports::{Delivery, DynChangeLog, DynEventConsumer};
use fhirmesh_core::service::{SearchRequest, UpdateRequest};
use fhirmesh_core::{
    DynResourceService, ErrorCategory, FhirError, Operation, RequestContext, ResourceChanged, TenantId,
};
use fhirmesh_fhir::ResourceType;
use fhirmesh_fhir::search::query::SearchScope;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc, watch};

use crate::delivery::{AttemptOutcome, HealthTracker, Notification, RetryPolicy, plan};
use crate::endpoint::EndpointPolicy;
use crate::matcher::Matcher;
use crate::metrics::{Finished, NotifierMetrics};
use crate::subscription::{ActiveSubscription, SubscriptionId, Transition};

/// The W3C trace context header sent with every notification of a traced change.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The notifier's checkpoint name in the change log.
pub const CONSUMER: &str = "notifier";

/// Sends one notification (the I/O adapter: an HTTP client that checks the endpoint policy on
/// the addresses it connects to, follows no redirect and reads no more than it needs).
#[async_trait]
pub trait Deliver: Send + Sync + 'static {
    async fn deliver(&self, notification: &Notification) -> AttemptOutcome;
}

/// A notification given up on after its last attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub tenant: TenantId,
    pub subscription: SubscriptionId,
    /// The change's event id (`{tenant}/{type}/{id}/_history/{version}`).
    pub event_id: String,
    pub attempts: u32,
    pub last_error: String,
    pub at: OffsetDateTime,
}

/// Where dead letters go (a file beside the embedded store; a queue in the mesh).
#[async_trait]
pub trait DeadLetters: Send + Sync + 'static {
    async fn put(&self, letter: DeadLetter);
}

/// How the notifier runs.
#[derive(Debug, Clone)]
pub struct NotifierSettings {
    pub policy: EndpointPolicy,
    pub retry: RetryPolicy,
    /// Failed attempts in a row before a subscription's status becomes `error`.
    pub error_after_failures: u32,
    /// Changes read at a time.
    pub batch_size: usize,
    /// Poll interval of the change log when no commit wakes the notifier.
    pub poll_interval: Duration,
    /// Notifications one subscription may have waiting; past it a new one is dead-lettered.
    pub max_queued_per_subscription: usize,
}

impl Default for NotifierSettings {
    fn default() -> Self {
        NotifierSettings {
            policy: EndpointPolicy::strict(),
            retry: RetryPolicy::default(),
            error_after_failures: 3,
            batch_size: 256,
            poll_interval: Duration::from_millis(200),
            max_queued_per_subscription: 1_000,
        }
    }
}

/// Where the notifier reads changes from (see the module documentation).
pub enum ChangeSource {
    /// The store's change log, from the notifier's checkpoint (one notifier per store).
    ChangeLog(DynChangeLog),
    /// The notifier's durable consumer on the bus, shared by every replica. `heartbeat` is how
    /// often a held change is reported in progress: well below the bus's ack wait.
    Bus { consumer: DynEventConsumer, heartbeat: Duration },
}

/// How long one read from the bus waits for a first change.
const BUS_FETCH_WAIT: Duration = Duration::from_secs(1);
/// How often subscriptions past their `end` are looked for.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

/// The notifier: see the module documentation.
pub struct Notifier {
    shared: Arc<Shared>,
    source: ChangeSource,
}

/// What the loop and the workers share.
struct Shared {
    service: DynResourceService,
    sender: Arc<dyn Deliver>,
    dead_letters: Arc<dyn DeadLetters>,
    settings: NotifierSettings,
    metrics: NotifierMetrics,
    matcher: RwLock<Matcher>,
    health: Mutex<HealthTracker>,
    tickets: Mutex<Tickets>,
    /// Wakes the loop when a notification is done (the checkpoint may move).
    done: Notify,
    /// Set when the notifier stops: workers drop what they hold (it is sent again after a restart).
    stopping: watch::Sender<bool>,
}

/// A notification waiting in its subscription's queue.
struct Job {
    /// The change's ticket in [`Tickets`].
    ticket: u64,
    subscription: Arc<ActiveSubscription>,
    change: Arc<ResourceChanged>,
    body: Option<Bytes>,
}

/// The changes whose notifications are not all done. From the change log, a ticket is the
/// change's sequence and every change up to `read` was matched; from the bus, a ticket numbers
/// a held delivery, acknowledged when its last notification is done.
#[derive(Debug, Default)]
struct Tickets {
    read: u64,
    next: u64,
    pending: BTreeMap<u64, Ticket>,
}

#[derive(Debug)]
struct Ticket {
    remaining: usize,
    delivery: Option<Arc<Delivery>>,
}

impl Tickets {
    /// The position a restart may resume from without losing a notification (change log).
    fn safe(&self) -> u64 {
        self.pending.keys().next().map_or(self.read, |first| first - 1)
    }

    /// Opens a ticket for a held bus delivery with `remaining` notifications.
    fn hold(&mut self, remaining: usize, delivery: Delivery) -> u64 {
        self.next += 1;
        self.pending.insert(self.next, Ticket { remaining, delivery: Some(Arc::new(delivery)) });
        self.next
    }

    /// One notification of `ticket` is done; the delivery to acknowledge when it was the last.
    fn done(&mut self, ticket: u64) -> Option<Arc<Delivery>> {
        let entry = self.pending.get_mut(&ticket)?;
        entry.remaining = entry.remaining.saturating_sub(1);
        if entry.remaining > 0 {
            return None;
        }
        self.pending.remove(&ticket).and_then(|t| t.delivery)
    }

    fn held(&self) -> Vec<Arc<Delivery>> {
        self.pending.values().filter_map(|t| t.delivery.clone()).collect()
    }
}

/// One subscription's queue: its worker's inbox and how many notifications it holds.
struct Queue {
    sender: mpsc::UnboundedSender<Job>,
    depth: Arc<AtomicUsize>,
}

fn context(tenant: &TenantId) -> RequestContext {
    RequestContext { tenant: tenant.clone(), ..RequestContext::default() }
}

fn subscription_type() -> ResourceType {
    ResourceType::parse("Subscription").expect("Subscription is an R4 resource type")
}

impl Notifier {
    pub fn new(
        service: DynResourceService,
        source: ChangeSource,
        sender: Arc<dyn Deliver>,
        dead_letters: Arc<dyn DeadLetters>,
        settings: NotifierSettings,
        metrics: NotifierMetrics,
    ) -> Notifier {
        let health = HealthTracker::new(settings.error_after_failures);
        Notifier {
            shared: Arc::new(Shared {
                service,
                sender,
                dead_letters,
                settings,
                metrics,
                matcher: RwLock::new(Matcher::new()),
                health: Mutex::new(health),
                tickets: Mutex::new(Tickets::default()),
                done: Notify::new(),
                stopping: watch::channel(false).0,
            }),
            source,
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        match &self.source {
            ChangeSource::ChangeLog(changes) => self.run_change_log(changes, shutdown).await,
            ChangeSource::Bus { consumer, heartbeat } => self.run_bus(consumer, *heartbeat, shutdown).await,
        }
    }

    /// From the change log. A first start begins at the end of the log (Subscriptions apply to
    /// changes after they exist); a restart resumes at its checkpoint.
    async fn run_change_log(&self, changes: &DynChangeLog, shutdown: impl Future<Output = ()>) {
        let shutdown = async {
            shutdown.await;
            self.shared.stopping.send_replace(true);
        };
        tokio::pin!(shutdown);
        let mut position = loop {
            match start_position(changes).await {
                Ok(position) => break position,
                Err(error) => {
                    self.shared.metrics.set_ready(false);
                    tracing::warn!(%error, "notifier cannot read its checkpoint; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(self.shared.settings.poll_interval) => {}
                    }
                }
            }
        };
        lock(&self.shared.tickets).read = position;
        let mut saved = position;
        let mut tenants_loaded: HashSet<TenantId> = HashSet::new();
        let mut queues: HashMap<(TenantId, SubscriptionId), Queue> = HashMap::new();
        let mut expired_at = tokio::time::Instant::now();
        loop {
            let batch = match changes.changes_after(position, self.shared.settings.batch_size).await {
                Ok(batch) => {
                    self.shared.metrics.set_ready(true);
                    batch
                }
                Err(error) => {
                    self.shared.metrics.set_ready(false);
                    tracing::warn!(%error, "notifier cannot read the change log; retrying");
                    Vec::new()
                }
            };
            for record in &batch {
                let change = Arc::new(ResourceChanged::from(record.clone()));
                let matched = loop {
                    let handled = async {
                        if !tenants_loaded.contains(&change.tenant) {
                            self.load_tenant(&change.tenant, change.sequence).await?;
                            tenants_loaded.insert(change.tenant.clone());
                        }
                        self.handle(&change).await
                    };
                    match handled.await {
                        Ok(matched) => break matched,
                        Err(error) => {
                            tracing::warn!(%error, event = %change.idempotency_key, "notifier cannot handle a change; retrying");
                            tokio::select! {
                                _ = &mut shutdown => return save(changes, saved).await,
                                _ = tokio::time::sleep(self.shared.settings.poll_interval) => {}
                            }
                        }
                    }
                };
                {
                    let mut tickets = lock(&self.shared.tickets);
                    if !matched.is_empty() {
                        tickets.pending.insert(change.sequence, Ticket { remaining: matched.len(), delivery: None });
                    }
                    tickets.read = change.sequence;
                }
                self.enqueue(&mut queues, change.sequence, &change, matched).await;
                position = change.sequence;
            }
            if expired_at.elapsed() >= EXPIRY_INTERVAL {
                self.expire_ended().await;
                expired_at = tokio::time::Instant::now();
            }
            let safe = lock(&self.shared.tickets).safe();
            if safe != saved {
                save(changes, safe).await;
                saved = safe;
            }
            if batch.is_empty() {
                tokio::select! {
                    _ = &mut shutdown => {
                        let safe = lock(&self.shared.tickets).safe();
                        return save(changes, safe).await;
                    }
                    _ = changes.wait_for_changes() => {}
                    _ = self.shared.done.notified() => {}
                    _ = tokio::time::sleep(self.shared.settings.poll_interval) => {}
                }
            }
        }
    }

    /// From the bus (see the module documentation).
    async fn run_bus(&self, consumer: &DynEventConsumer, heartbeat: Duration, shutdown: impl Future<Output = ()>) {
        tokio::spawn(report_in_progress(self.shared.clone(), heartbeat));
        tokio::pin!(shutdown);
        let mut queues: HashMap<(TenantId, SubscriptionId), Queue> = HashMap::new();
        let mut expired_at = tokio::time::Instant::now();
        loop {
            let fetched = tokio::select! {
                _ = &mut shutdown => break,
                fetched = consumer.fetch(self.shared.settings.batch_size, BUS_FETCH_WAIT) => fetched,
            };
            let deliveries = match fetched {
                Ok(deliveries) => {
                    self.shared.metrics.set_ready(true);
                    deliveries
                }
                Err(error) => {
                    self.shared.metrics.set_ready(false);
                    tracing::warn!(%error, "notifier cannot read from the bus; retrying");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(self.shared.settings.poll_interval) => {}
                    }
                    continue;
                }
            };
            // One consistent reload per tenant in the batch, before any of its changes is matched.
            let mut newest: HashMap<TenantId, u64> = HashMap::new();
            for delivery in &deliveries {
                let sequence = newest.entry(delivery.event.tenant.clone()).or_default();
                *sequence = (*sequence).max(delivery.event.sequence);
            }
            let mut unavailable: HashSet<TenantId> = HashSet::new();
            for (tenant, sequence) in newest {
                if let Err(error) = self.reload_tenant(&tenant, sequence).await {
                    tracing::warn!(%tenant, %error, "notifier cannot load the tenant's Subscriptions; changes retried");
                    unavailable.insert(tenant);
                }
            }
            let mut acks = Vec::new();
            for delivery in deliveries {
                let change = Arc::clone(&delivery.event);
                let handled = if unavailable.contains(&change.tenant) {
                    Err("the tenant's Subscriptions could not be loaded".to_owned())
                } else {
                    self.handle(&change).await
                };
                match handled {
                    Ok(matched) if matched.is_empty() => acks.push(delivery),
                    Ok(matched) => {
                        let ticket = lock(&self.shared.tickets).hold(matched.len(), delivery);
                        self.enqueue(&mut queues, ticket, &change, matched).await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, event = %change.idempotency_key, "notifier cannot handle a change; the bus delivers it again");
                        let delay = self.shared.settings.retry.next_delay(delivery.attempt);
                        if let Err(error) = delivery.ack.nak(delay).await {
                            tracing::debug!(%error, "cannot give a change back to the bus; it comes back after the ack wait");
                        }
                    }
                }
            }
            for result in futures::future::join_all(acks.iter().map(|d| d.ack.ack())).await {
                if let Err(error) = result {
                    tracing::debug!(%error, "cannot acknowledge a change; the bus delivers it again");
                }
            }
            if expired_at.elapsed() >= EXPIRY_INTERVAL {
                self.expire_ended().await;
                expired_at = tokio::time::Instant::now();
            }
        }
        // What is held is not acknowledged: the bus delivers it again after its ack wait.
        self.shared.stopping.send_replace(true);
    }

    /// Queues each matched notification of `change` under `ticket`; a full queue dead-letters it.
    async fn enqueue(
        &self,
        queues: &mut HashMap<(TenantId, SubscriptionId), Queue>,
        ticket: u64,
        change: &Arc<ResourceChanged>,
        matched: Vec<(Arc<ActiveSubscription>, Option<Bytes>)>,
    ) {
        for (subscription, body) in matched {
            let key = (subscription.tenant().clone(), subscription.id().clone());
            let queue = queues.entry(key).or_insert_with(|| spawn_worker(self.shared.clone()));
            let depth = queue.depth.load(Ordering::Acquire);
            let failing = lock(&self.shared.health).is_failing(subscription.tenant(), subscription.id());
            // In error, the one notification held is the probe: no backlog for a failing endpoint.
            let limit = if failing { 1 } else { self.shared.settings.max_queued_per_subscription.max(1) };
            if depth >= limit {
                let reason = if failing {
                    "not attempted: the subscription is in error and already holds a notification".to_owned()
                } else {
                    format!("not attempted: {depth} notifications of this subscription were waiting")
                };
                let job = Job { ticket, subscription, change: change.clone(), body };
                overflow(&self.shared, &job, reason).await;
                continue;
            }
            queue.depth.fetch_add(1, Ordering::AcqRel);
            self.shared.metrics.queued(1);
            let job = Job { ticket, subscription, change: change.clone(), body };
            if let Err(mpsc::error::SendError(job)) = queue.sender.send(job) {
                // The worker is gone (it cannot be, short of a panic): the notification counts as done.
                queue.depth.fetch_sub(1, Ordering::AcqRel);
                self.shared.metrics.queued(-1);
                finish(&self.shared, job.ticket).await;
            }
        }
    }

    /// Keeps the registry current with `change` and returns the subscriptions it notifies, with
    /// the body each notification carries.
    async fn handle(
        &self,
        change: &Arc<ResourceChanged>,
    ) -> Result<Vec<(Arc<ActiveSubscription>, Option<Bytes>)>, String> {
        if change.resource_type == subscription_type() {
            self.subscription_changed(change).await?;
            return Ok(Vec::new());
        }
        let now = OffsetDateTime::now_utc();
        let has_candidates = {
            let matcher = read(&self.shared.matcher);
            matcher.has_subscriptions_for(&change.tenant, change.resource_type)
        };
        if !has_candidates {
            return Ok(Vec::new());
        }
        let body = match (&change.resource, change.operation) {
            (Some(body), _) => Some(body.clone()),
            (None, Operation::Delete) => self.last_live_version(change).await?,
            (None, _) => self.current_body(change).await?,
        };
        let resource: Option<Value> = match &body {
            Some(body) => Some(serde_json::from_slice(body).map_err(|e| format!("stored resource is not JSON: {e}"))?),
            None => None,
        };
        let matched = read(&self.shared.matcher)
            .matching(change, resource.as_ref(), now)
            .map_err(|e| format!("cannot match {}: {e:?}", change.idempotency_key))?;
        // A delete carries no body to its receivers; the last live version only decided the match.
        let payload = if change.operation == Operation::Delete { None } else { body };
        Ok(matched.into_iter().map(|subscription| (subscription, payload.clone())).collect())
    }

    /// `tenant`'s Subscriptions that are not `off`, as (id, version, body), from an index that has
    /// applied at least `sequence`.
    async fn search_subscriptions(
        &self,
        tenant: &TenantId,
        sequence: u64,
    ) -> Result<Vec<(SubscriptionId, u64, Bytes)>, String> {
        let ctx = context(tenant);
        let mut found = Vec::new();
        let mut page_token = None;
        loop {
            let request = SearchRequest {
                scope: SearchScope::Type(subscription_type()),
                params: vec![("status".into(), "requested,active,error".into()), ("_count".into(), "1000".into())],
                strict: false,
                page_token: page_token.take(),
                consistency_token: Some(sequence),
            };
            let page = self.shared.service.search(&ctx, request).await.map_err(|e| e.to_string())?;
            for version in page.entries {
                if let Some(body) = version.body {
                    found.push((version.id, version.version_id, body));
                }
            }
            match page.next_page_token {
                Some(token) => page_token = Some(token),
                None => return Ok(found),
            }
        }
    }

    /// Loads `tenant`'s Subscriptions that are not `off` (see [`Notifier::search_subscriptions`]).
    async fn load_tenant(&self, tenant: &TenantId, sequence: u64) -> Result<(), String> {
        for (_, _, body) in self.search_subscriptions(tenant, sequence).await? {
            self.upsert(tenant, &body).await;
        }
        self.shared.metrics.set_subscriptions(read(&self.shared.matcher).len());
        Ok(())
    }

    /// Makes the registry of `tenant` what the index says as of `sequence`: new versions loaded,
    /// subscriptions no longer found (deleted, `off`) dropped.
    async fn reload_tenant(&self, tenant: &TenantId, sequence: u64) -> Result<(), String> {
        let found = self.search_subscriptions(tenant, sequence).await?;
        let mut keep = HashSet::new();
        for (id, version_id, body) in found {
            let held = read(&self.shared.matcher).get(tenant, &id).map(|s| s.version_id());
            if held != Some(version_id) {
                self.upsert(tenant, &body).await;
            }
            keep.insert(id);
        }
        let dropped = write(&self.shared.matcher).retain(tenant, &keep);
        for id in dropped {
            lock(&self.shared.health).forget(tenant, &id);
        }
        self.shared.metrics.set_subscriptions(read(&self.shared.matcher).len());
        Ok(())
    }

    /// Follows a Subscription change: a delete drops it; a live version (read from the store when
    /// the change came without its body) is upserted.
    async fn subscription_changed(&self, change: &ResourceChanged) -> Result<(), String> {
        if change.operation == Operation::Delete {
            write(&self.shared.matcher).remove(&change.tenant, &change.id, change.version_id);
            lock(&self.shared.health).forget(&change.tenant, &change.id);
            self.shared.metrics.set_subscriptions(read(&self.shared.matcher).len());
            return Ok(());
        }
        let body = match &change.resource {
            Some(body) => Some(body.clone()),
            None => self.current_body(change).await?,
        };
        if let Some(body) = body {
            self.upsert(&change.tenant, &body).await;
        }
        self.shared.metrics.set_subscriptions(read(&self.shared.matcher).len());
        Ok(())
    }

    /// Holds a Subscription version (or drops it when `off`), and writes its activation.
    async fn upsert(&self, tenant: &TenantId, body: &Bytes) {
        let resource: Value = match serde_json::from_slice(body) {
            Ok(resource) => resource,
            Err(error) => return tracing::error!(%error, "stored Subscription is not JSON"),
        };
        let subscription =
            match ActiveSubscription::from_resource(tenant.clone(), &resource, &self.shared.settings.policy) {
                Ok(subscription) => subscription,
                Err(error) => {
                    // Stored before today's rules (or the policy changed): it cannot deliver.
                    let id = resource.get("id").and_then(Value::as_str).unwrap_or("?");
                    tracing::warn!(%tenant, id, error = %error, "Subscription cannot be loaded");
                    if let Ok(id) = fhirmesh_fhir::LogicalId::parse(id)
                        && resource.get("status").and_then(Value::as_str) != Some("error")
                    {
                        let reason = format!("not loaded by the notifier: {}", error);
                        self.transition(tenant, &id, Transition::ToError { reason }).await;
                    }
                    return;
                }
            };
        let activation = subscription.activation(OffsetDateTime::now_utc());
        let id = subscription.id().clone();
        lock(&self.shared.health).track(&subscription);
        write(&self.shared.matcher).upsert(subscription);
        if let Some(transition) = activation {
            self.transition(tenant, &id, transition).await;
        }
    }

    /// The body of the version a change is about, when the change carried none.
    async fn current_body(&self, change: &ResourceChanged) -> Result<Option<Bytes>, String> {
        let ctx = context(&change.tenant);
        match self.shared.service.vread(&ctx, change.resource_type, change.id.clone(), change.version_id).await {
            Ok(version) => Ok(version.body),
            Err(error) if error.category == ErrorCategory::NotFound => Ok(None),
            Err(error) => Err(error.to_string()),
        }
    }

    /// The version before a delete, when it was live: what the delete's match is decided on.
    async fn last_live_version(&self, change: &ResourceChanged) -> Result<Option<Bytes>, String> {
        if change.version_id <= 1 {
            return Ok(None);
        }
        let ctx = context(&change.tenant);
        match self.shared.service.vread(&ctx, change.resource_type, change.id.clone(), change.version_id - 1).await {
            Ok(version) => Ok(version.body),
            Err(error) if matches!(error.category, ErrorCategory::NotFound | ErrorCategory::Gone) => Ok(None),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Writes `off` on subscriptions whose `end` has passed.
    async fn expire_ended(&self) {
        let expired = read(&self.shared.matcher).expired(OffsetDateTime::now_utc());
        for (tenant, id) in expired {
            self.transition(&tenant, &id, Transition::ToOff).await;
        }
    }

    async fn transition(&self, tenant: &TenantId, id: &SubscriptionId, transition: Transition) {
        write_transition(&self.shared, tenant, id, transition).await;
    }
}

/// Writes a status transition to the current version of a Subscription, `If-Match` it: when a
/// client updated it meanwhile, their version wins (and is evaluated when its change arrives).
async fn write_transition(shared: &Shared, tenant: &TenantId, id: &SubscriptionId, transition: Transition) {
    let outcome: Result<(), FhirError> = async {
        let ctx = context(tenant);
        let current = shared.service.read(&ctx, subscription_type(), id.clone()).await?;
        let Some(body) = current.body else { return Ok(()) };
        let mut resource: Value = serde_json::from_slice(&body).map_err(|e| FhirError::internal(e.to_string()))?;
        let before = resource.clone();
        transition.apply(&mut resource);
        if resource == before {
            return Ok(());
        }
        let body = Bytes::from(serde_json::to_vec(&resource).map_err(|e| FhirError::internal(e.to_string()))?);
        let request = UpdateRequest {
            resource_type: subscription_type(),
            id: id.clone(),
            body,
            if_match: Some(current.version_id),
        };
        shared.service.update(&ctx, request).await.map(|_| ())
    }
    .await;
    match outcome {
        Ok(()) => tracing::info!(%tenant, %id, status = transition.status().as_str(), "Subscription status written"),
        Err(error) if matches!(error.category, ErrorCategory::PreconditionFailed | ErrorCategory::Conflict) => {
            tracing::debug!(%tenant, %id, "Subscription changed meanwhile; its own version stands");
        }
        Err(error) if matches!(error.category, ErrorCategory::NotFound | ErrorCategory::Gone) => {}
        Err(error) => tracing::warn!(%tenant, %id, %error, "cannot write a Subscription status"),
    }
}

/// The queue of one subscription, and its worker: notifications in order, each until delivered
/// or dead-lettered.
fn spawn_worker(shared: Arc<Shared>) -> Queue {
    let (sender, mut jobs) = mpsc::unbounded_channel::<Job>();
    let depth = Arc::new(AtomicUsize::new(0));
    let held = Arc::clone(&depth);
    let mut stopping = shared.stopping.subscribe();
    tokio::spawn(async move {
        loop {
            let job = tokio::select! {
                _ = stopping.wait_for(|stop| *stop) => return,
                job = jobs.recv() => match job { Some(job) => job, None => return },
            };
            let failing = lock(&shared.health).is_failing(job.subscription.tenant(), job.subscription.id());
            if failing && held.load(Ordering::Acquire) > 1 {
                // In error, only the newest notification waits (the probe); older ones go now.
                let reason = "not attempted: the subscription is in error and a newer notification is waiting";
                overflow(&shared, &job, reason.to_owned()).await;
                held.fetch_sub(1, Ordering::AcqRel);
                shared.metrics.queued(-1);
                continue;
            }
            tokio::select! {
                // Not done: its change is neither checkpointed nor acknowledged, so it is sent again.
                _ = stopping.wait_for(|stop| *stop) => return,
                () = deliver(&shared, &job) => {}
            }
            held.fetch_sub(1, Ordering::AcqRel);
            shared.metrics.queued(-1);
            finish(&shared, job.ticket).await;
        }
    });
    Queue { sender, depth }
}

/// Dead-letters a notification without attempting it, and counts it done.
async fn overflow(shared: &Shared, job: &Job, reason: String) {
    let letter = DeadLetter {
        tenant: job.subscription.tenant().clone(),
        subscription: job.subscription.id().clone(),
        event_id: job.change.idempotency_key.clone(),
        attempts: 0,
        last_error: reason,
        at: OffsetDateTime::now_utc(),
    };
    tracing::warn!(tenant = %letter.tenant, id = %letter.subscription, event = %letter.event_id, reason = %letter.last_error, "notification dead-lettered unattempted");
    shared.dead_letters.put(letter).await;
    shared.metrics.finished(Finished::Overflowed, None);
    finish(shared, job.ticket).await;
}

/// One notification of `ticket` is done: acknowledges its change when it was the last one.
async fn finish(shared: &Shared, ticket: u64) {
    let delivery = lock(&shared.tickets).done(ticket);
    if let Some(delivery) = delivery
        && let Err(error) = delivery.ack.ack().await
    {
        tracing::debug!(%error, "cannot acknowledge a change; the bus delivers it again");
    }
    shared.done.notify_one();
}

/// Tells the bus, every `heartbeat`, that the changes held are still being worked on.
async fn report_in_progress(shared: Arc<Shared>, heartbeat: Duration) {
    let mut stopping = shared.stopping.subscribe();
    loop {
        tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(heartbeat) => {}
        }
        let held = lock(&shared.tickets).held();
        let reports = futures::future::join_all(held.iter().map(|d| d.ack.in_progress())).await;
        for error in reports.into_iter().filter_map(Result::err) {
            tracing::debug!(%error, "cannot extend a held change's deadline");
        }
    }
}

/// Sends `job` until it is delivered, dead-lettered or no longer wanted, in a span that is a
/// child of the write's trace; each request carries that span as its `traceparent` (or the
/// write's own when spans are not exported), so the receiver can continue the trace.
async fn deliver(shared: &Shared, job: &Job) {
    let span = tracing::info_span!(
        "notification",
        otel.name = "notify",
        otel.kind = "producer",
        subscription = %job.subscription.id(),
        event = %job.change.idempotency_key,
        attempts = tracing::field::Empty,
        outcome = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    fhirmesh_core::trace::set_parent(&span, job.change.traceparent.as_deref());
    let traceparent = fhirmesh_core::trace::outgoing_traceparent(&span, job.change.traceparent.as_deref());
    tracing::Instrument::instrument(attempt_until_done(shared, job, traceparent), span).await;
}

async fn attempt_until_done(shared: &Shared, job: &Job, traceparent: Option<String>) {
    let tenant = job.subscription.tenant();
    let id = job.subscription.id();
    let mut failed = 0u32;
    loop {
        // The subscription as it is now: turned off, deleted or ended → nothing more to send.
        let now = OffsetDateTime::now_utc();
        let Some(current) = read(&shared.matcher).get(tenant, id) else { return };
        if !current.is_deliverable(now) {
            return;
        }
        let outcome = match plan(&current, &job.change, job.body.clone(), now) {
            Ok(mut notification) => {
                if let Some(traceparent) = &traceparent {
                    notification.headers.push((TRACEPARENT_HEADER.to_owned(), traceparent.clone()));
                }
                shared.sender.deliver(&notification).await
            }
            Err(error) => AttemptOutcome::Failed { reason: format!("{error:?}") },
        };
        shared.metrics.attempt(outcome == AttemptOutcome::Delivered);
        let transition = lock(&shared.health).record(tenant, id, &outcome);
        if let Some(transition) = transition {
            write_transition(shared, tenant, id, transition).await;
        }
        tracing::Span::current().record("attempts", failed + 1);
        let AttemptOutcome::Failed { reason } = outcome else {
            tracing::Span::current().record("outcome", "delivered");
            let since_commit = OffsetDateTime::now_utc() - job.change.last_updated;
            shared.metrics.finished(Finished::Delivered, since_commit.try_into().ok());
            return;
        };
        failed += 1;
        match shared.settings.retry.next_delay(failed) {
            Some(delay) => tokio::time::sleep(delay).await,
            None => {
                tracing::Span::current().record("outcome", "dead-lettered");
                tracing::warn!(%tenant, %id, event = %job.change.idempotency_key, %reason, "notification dead-lettered");
                let letter = DeadLetter {
                    tenant: tenant.clone(),
                    subscription: id.clone(),
                    event_id: job.change.idempotency_key.clone(),
                    attempts: failed,
                    last_error: reason,
                    at: OffsetDateTime::now_utc(),
                };
                shared.dead_letters.put(letter).await;
                shared.metrics.finished(Finished::DeadLettered, None);
                return;
            }
        }
    }
}

async fn start_position(changes: &DynChangeLog) -> Result<u64, String> {
    let checkpoint = changes.checkpoint(CONSUMER).await.map_err(|e| e.to_string())?;
    if checkpoint > 0 {
        return Ok(checkpoint);
    }
    let latest = changes.latest_sequence().await.map_err(|e| e.to_string())?;
    changes.save_checkpoint(CONSUMER, latest).await.map_err(|e| e.to_string())?;
    Ok(latest)
}

async fn save(changes: &DynChangeLog, position: u64) {
    if let Err(error) = changes.save_checkpoint(CONSUMER, position).await {
        tracing::warn!(%error, "notifier cannot save its checkpoint");
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_safe_position_stops_before_the_first_unfinished_change() {
        let mut progress = Tickets { read: 10, ..Tickets::default() };
        assert_eq!(progress.safe(), 10);
        progress.pending.insert(4, Ticket { remaining: 2, delivery: None });
        progress.pending.insert(7, Ticket { remaining: 1, delivery: None });
        assert_eq!(progress.safe(), 3);
        progress.done(4);
        assert_eq!(progress.safe(), 3, "one notification of change 4 is still pending");
        progress.done(4);
        assert_eq!(progress.safe(), 6);
        progress.done(7);
        assert_eq!(progress.safe(), 10);
        progress.done(7); // unknown: nothing happens
        assert_eq!(progress.safe(), 10);
    }
}
