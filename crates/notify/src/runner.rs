//! The notifier loop around the pure parts of this crate: it follows the store's change log from
//! its own checkpoint, keeps the [`Matcher`] equal to the tenants' Subscriptions, matches every
//! change, and hands each notification to the queue of its subscription, where a worker sends it
//! ([`Deliver`]), retries it with the [`RetryPolicy`], dead-letters it after the last attempt
//! ([`DeadLetters`]) and writes the status transitions of [`HealthTracker`] back to the
//! Subscription through the resource service.
//!
//! - **Isolation**: one queue and one worker per subscription: a slow or dead endpoint delays only
//!   its own notifications (in order), never another subscription's.
//! - **Nothing lost**: the checkpoint moves only past changes whose notifications are all done
//!   (delivered or dead-lettered). A notifier stopped mid-stream resumes there and sends again
//!   what was in flight: at-least-once, receivers de-duplicate on the event id header.
//! - **Registry**: a tenant's Subscriptions are loaded by a search (consistent with the change
//!   being matched: the search waits until the index has applied it) the first time a change of
//!   that tenant arrives, then kept current from the Subscription changes in the log, in order —
//!   so a Subscription applies to every change committed after it.
//! - **Lifecycle**: `requested` → `active` as soon as it is loaded; `error` after
//!   `error_after_failures` failed attempts in a row and back to `active` on the next success;
//!   `off` when `end` has passed. Written with `If-Match`: a client's concurrent update wins.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fhirmesh_core::ports::DynChangeLog;
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
use crate::subscription::{ActiveSubscription, SubscriptionId, Transition};

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
    /// Changes read from the log at a time.
    pub batch_size: usize,
    /// Poll interval of the change log when no commit wakes the notifier.
    pub poll_interval: Duration,
}

impl Default for NotifierSettings {
    fn default() -> Self {
        NotifierSettings {
            policy: EndpointPolicy::strict(),
            retry: RetryPolicy::default(),
            error_after_failures: 3,
            batch_size: 256,
            poll_interval: Duration::from_millis(200),
        }
    }
}

/// The notifier: see the module documentation.
pub struct Notifier {
    shared: Arc<Shared>,
    changes: DynChangeLog,
}

/// What the loop and the workers share.
struct Shared {
    service: DynResourceService,
    sender: Arc<dyn Deliver>,
    dead_letters: Arc<dyn DeadLetters>,
    settings: NotifierSettings,
    matcher: RwLock<Matcher>,
    health: Mutex<HealthTracker>,
    progress: Mutex<Progress>,
    /// Wakes the loop when a notification is done (the checkpoint may move).
    done: Notify,
    /// Set when the notifier stops: workers drop what they hold (it is sent again after a restart).
    stopping: watch::Sender<bool>,
}

/// A notification waiting in its subscription's queue.
struct Job {
    sequence: u64,
    subscription: Arc<ActiveSubscription>,
    change: Arc<ResourceChanged>,
    body: Option<Bytes>,
}

/// Which changes are fully handled: every change up to `read` was matched; `pending` counts the
/// notifications not done yet per change sequence.
#[derive(Debug, Default)]
struct Progress {
    read: u64,
    pending: BTreeMap<u64, usize>,
}

impl Progress {
    /// The position a restart may resume from without losing a notification.
    fn safe(&self) -> u64 {
        self.pending.keys().next().map_or(self.read, |first| first - 1)
    }

    fn done(&mut self, sequence: u64) {
        if let Some(count) = self.pending.get_mut(&sequence) {
            *count -= 1;
            if *count == 0 {
                self.pending.remove(&sequence);
            }
        }
    }
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
        changes: DynChangeLog,
        sender: Arc<dyn Deliver>,
        dead_letters: Arc<dyn DeadLetters>,
        settings: NotifierSettings,
    ) -> Notifier {
        let health = HealthTracker::new(settings.error_after_failures);
        Notifier {
            shared: Arc::new(Shared {
                service,
                sender,
                dead_letters,
                settings,
                matcher: RwLock::new(Matcher::new()),
                health: Mutex::new(health),
                progress: Mutex::new(Progress::default()),
                done: Notify::new(),
                stopping: watch::channel(false).0,
            }),
            changes,
        }
    }

    /// Runs until `shutdown`. A first start begins at the end of the log (Subscriptions apply to
    /// changes after they exist); a restart resumes at its checkpoint.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shutdown = async {
            shutdown.await;
            self.shared.stopping.send_replace(true);
        };
        tokio::pin!(shutdown);
        let mut position = loop {
            match self.start_position().await {
                Ok(position) => break position,
                Err(error) => {
                    tracing::warn!(%error, "notifier cannot read its checkpoint; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(self.shared.settings.poll_interval) => {}
                    }
                }
            }
        };
        lock(&self.shared.progress).read = position;
        let mut saved = position;
        let mut tenants_loaded: HashSet<TenantId> = HashSet::new();
        let mut queues: HashMap<(TenantId, SubscriptionId), mpsc::UnboundedSender<Job>> = HashMap::new();
        loop {
            let batch = match self.changes.changes_after(position, self.shared.settings.batch_size).await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(%error, "notifier cannot read the change log; retrying");
                    Vec::new()
                }
            };
            for record in &batch {
                let change = Arc::new(ResourceChanged::from(record.clone()));
                let jobs = loop {
                    match self.handle(&change, &mut tenants_loaded).await {
                        Ok(jobs) => break jobs,
                        Err(error) => {
                            tracing::warn!(%error, event = %change.idempotency_key, "notifier cannot handle a change; retrying");
                            tokio::select! {
                                _ = &mut shutdown => return self.save(saved).await,
                                _ = tokio::time::sleep(self.shared.settings.poll_interval) => {}
                            }
                        }
                    }
                };
                {
                    let mut progress = lock(&self.shared.progress);
                    if !jobs.is_empty() {
                        progress.pending.insert(change.sequence, jobs.len());
                    }
                    progress.read = change.sequence;
                }
                for job in jobs {
                    let key = (job.subscription.tenant().clone(), job.subscription.id().clone());
                    let queue = queues.entry(key).or_insert_with(|| spawn_worker(self.shared.clone()));
                    if let Err(mpsc::error::SendError(job)) = queue.send(job) {
                        // The worker is gone (it cannot be, short of a panic): the change counts as done.
                        lock(&self.shared.progress).done(job.sequence);
                    }
                }
                position = change.sequence;
            }
            self.expire_ended().await;
            let safe = lock(&self.shared.progress).safe();
            if safe != saved {
                self.save(safe).await;
                saved = safe;
            }
            if batch.is_empty() {
                tokio::select! {
                    _ = &mut shutdown => {
                        let safe = lock(&self.shared.progress).safe();
                        return self.save(safe).await;
                    }
                    _ = self.changes.wait_for_changes() => {}
                    _ = self.shared.done.notified() => {}
                    _ = tokio::time::sleep(self.shared.settings.poll_interval) => {}
                }
            }
        }
    }

    async fn start_position(&self) -> Result<u64, String> {
        let checkpoint = self.changes.checkpoint(CONSUMER).await.map_err(|e| e.to_string())?;
        if checkpoint > 0 {
            return Ok(checkpoint);
        }
        let latest = self.changes.latest_sequence().await.map_err(|e| e.to_string())?;
        self.changes.save_checkpoint(CONSUMER, latest).await.map_err(|e| e.to_string())?;
        Ok(latest)
    }

    async fn save(&self, position: u64) {
        if let Err(error) = self.changes.save_checkpoint(CONSUMER, position).await {
            tracing::warn!(%error, "notifier cannot save its checkpoint");
        }
    }

    /// Keeps the registry current with `change` and returns the notifications it causes.
    async fn handle(
        &self,
        change: &Arc<ResourceChanged>,
        tenants_loaded: &mut HashSet<TenantId>,
    ) -> Result<Vec<Job>, String> {
        if !tenants_loaded.contains(&change.tenant) {
            self.load_tenant(&change.tenant, change.sequence).await?;
            tenants_loaded.insert(change.tenant.clone());
        }
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
        Ok(matched
            .into_iter()
            .map(|subscription| Job {
                sequence: change.sequence,
                subscription,
                change: change.clone(),
                body: payload.clone(),
            })
            .collect())
    }

    /// Loads `tenant`'s Subscriptions that are not `off`, from an index that has applied at
    /// least `sequence`.
    async fn load_tenant(&self, tenant: &TenantId, sequence: u64) -> Result<(), String> {
        let ctx = context(tenant);
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
                if let Some(body) = &version.body {
                    self.upsert(tenant, body).await;
                }
            }
            match page.next_page_token {
                Some(token) => page_token = Some(token),
                None => return Ok(()),
            }
        }
    }

    /// Follows a Subscription change: a delete drops it; a live version (read from the store when
    /// the change came without its body) is upserted.
    async fn subscription_changed(&self, change: &ResourceChanged) -> Result<(), String> {
        if change.operation == Operation::Delete {
            write(&self.shared.matcher).remove(&change.tenant, &change.id, change.version_id);
            lock(&self.shared.health).forget(&change.tenant, &change.id);
            return Ok(());
        }
        let body = match &change.resource {
            Some(body) => Some(body.clone()),
            None => self.current_body(change).await?,
        };
        if let Some(body) = body {
            self.upsert(&change.tenant, &body).await;
        }
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
fn spawn_worker(shared: Arc<Shared>) -> mpsc::UnboundedSender<Job> {
    let (sender, mut jobs) = mpsc::unbounded_channel::<Job>();
    let mut stopping = shared.stopping.subscribe();
    tokio::spawn(async move {
        loop {
            let job = tokio::select! {
                _ = stopping.wait_for(|stop| *stop) => return,
                job = jobs.recv() => match job { Some(job) => job, None => return },
            };
            tokio::select! {
                // Not done: the checkpoint stays before it, so a restart sends it again.
                _ = stopping.wait_for(|stop| *stop) => return,
                () = deliver(&shared, &job) => {}
            }
            lock(&shared.progress).done(job.sequence);
            shared.done.notify_one();
        }
    });
    sender
}

async fn deliver(shared: &Shared, job: &Job) {
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
            Ok(notification) => shared.sender.deliver(&notification).await,
            Err(error) => AttemptOutcome::Failed { reason: format!("{error:?}") },
        };
        let transition = lock(&shared.health).record(tenant, id, &outcome);
        if let Some(transition) = transition {
            write_transition(shared, tenant, id, transition).await;
        }
        let AttemptOutcome::Failed { reason } = outcome else { return };
        failed += 1;
        match shared.settings.retry.next_delay(failed) {
            Some(delay) => tokio::time::sleep(delay).await,
            None => {
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
                return;
            }
        }
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
        let mut progress = Progress { read: 10, pending: BTreeMap::new() };
        assert_eq!(progress.safe(), 10);
        progress.pending.insert(4, 2);
        progress.pending.insert(7, 1);
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
