//! The notifier service as a composition root: the notifier loop of `fhirmesh-notify` with an
//! HTTP client for rest-hooks and a dead-letter file. No domain logic here.
//!
//! The client enforces the endpoint policy where it matters — on the addresses it connects to: a
//! host name is resolved by [`PolicyResolver`], which refuses the whole endpoint if any address it
//! resolves to is not allowed, and the connection goes to exactly those addresses (no second
//! lookup a DNS rebinding could answer differently). Redirects are not followed (a 3xx is a failed
//! attempt); the response body is never read.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fhirmesh_core::DynResourceService;
use fhirmesh_notify::delivery::Method;
use fhirmesh_notify::runner::{ChangeSource, DeadLetter, DeadLetters, Deliver, Notifier, NotifierSettings};
use fhirmesh_notify::{AttemptOutcome, EndpointPolicy, Notification, NotifierMetrics};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

/// Starts the notifier on the current runtime, reading `source`; it stops when `shutdown`
/// resolves.
pub fn spawn(
    service: DynResourceService,
    source: ChangeSource,
    settings: NotifierSettings,
    timeout: Duration,
    dead_letter_file: PathBuf,
    metrics: NotifierMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<JoinHandle<()>, String> {
    let sender = Arc::new(HttpSender::new(settings.policy.clone(), timeout)?);
    let dead_letters = Arc::new(FileDeadLetters { path: dead_letter_file });
    let notifier = Notifier::new(service, source, sender, dead_letters, settings, metrics);
    Ok(tokio::spawn(notifier.run(shutdown)))
}

/// Rest-hook requests over HTTP(S).
pub struct HttpSender {
    client: reqwest::Client,
    policy: EndpointPolicy,
}

impl HttpSender {
    pub fn new(policy: EndpointPolicy, timeout: Duration) -> Result<HttpSender, String> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .no_proxy()
            .dns_resolver(Arc::new(PolicyResolver { policy: policy.clone() }))
            .user_agent(concat!("fhirmesh-notifier/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the rest-hook HTTP client: {e}"))?;
        Ok(HttpSender { client, policy })
    }
}

#[async_trait]
impl Deliver for HttpSender {
    async fn deliver(&self, notification: &Notification) -> AttemptOutcome {
        // Checked again at send time: the policy may have changed since the Subscription was stored.
        if let Err(refused) = self.policy.check(&notification.url) {
            return AttemptOutcome::Failed { reason: format!("endpoint refused: {refused}") };
        }
        let method = match notification.method {
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            Method::Delete => reqwest::Method::DELETE,
        };
        let mut request = self.client.request(method, &notification.url);
        for (name, value) in &notification.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(body) = &notification.body {
            request = request.body(body.clone());
        }
        match request.send().await {
            // The body is not read: dropping the response closes what is left of it.
            Ok(response) => AttemptOutcome::from_status(response.status().as_u16()),
            Err(error) => AttemptOutcome::Failed { reason: describe(&error) },
        }
    }
}

/// A short reason for `Subscription.error`.
fn describe(error: &reqwest::Error) -> String {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_builder() {
        "invalid request"
    } else {
        "request failed"
    };
    let reason = format!("{what}: {}", fhirmesh_core::error::chain(error));
    reason.chars().take(300).collect()
}

/// Resolves endpoint host names and refuses the endpoint unless every address is allowed.
struct PolicyResolver {
    policy: EndpointPolicy,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ips: Vec<std::net::IpAddr> = addresses.iter().map(SocketAddr::ip).collect();
            // The policy judges a host by its endpoint form; the scheme does not matter here.
            let endpoint = policy.check(&format!("https://{host}/"))?;
            policy.check_resolved(&endpoint, &ips)?;
            let addrs: Addrs = Box::new(addresses.into_iter());
            Ok(addrs)
        })
    }
}

/// Dead letters as NDJSON lines appended to a file beside the embedded store.
struct FileDeadLetters {
    path: PathBuf,
}

#[async_trait]
impl DeadLetters for FileDeadLetters {
    async fn put(&self, letter: DeadLetter) {
        let line = serde_json::json!({
            "tenant": letter.tenant.as_str(),
            "subscription": format!("Subscription/{}", letter.subscription),
            "eventId": letter.event_id,
            "attempts": letter.attempts,
            "lastError": letter.last_error,
            "at": letter.at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        });
        let written = async {
            let mut file = tokio::fs::OpenOptions::new().create(true).append(true).open(&self.path).await?;
            file.write_all(format!("{line}\n").as_bytes()).await?;
            file.flush().await
        }
        .await;
        if let Err(error) = written {
            tracing::error!(%error, path = %self.path.display(), %line, "cannot write a dead letter");
        }
    }
}
