//! The cached JWKS: loaded at start, refreshed in the background when stale, refetched (rate-limited,
//! single-flight) when a token names a key it does not hold. See `design.md`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::{ConfigError, DEFAULT_MIN_REFETCH, JwksSource, check_url, is_loopback};
use crate::jwks::{JwksError, KeySet};

/// Largest JWKS accepted, from a file or over HTTP.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Whole-request limit for a JWKS fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REDIRECTS: usize = 3;

pub(crate) struct KeyStore {
    fetcher: Fetcher,
    location: String,
    /// `None` for a file: it is re-read only on an unknown key.
    refresh: Option<Duration>,
    min_refetch: Duration,
    state: Mutex<State>,
    /// Held across a fetch, so concurrent refetches collapse into one.
    fetch_lock: tokio::sync::Mutex<()>,
    /// A background refresh has been spawned and has not finished.
    refreshing: AtomicBool,
}

struct State {
    keys: Arc<KeySet>,
    /// The last successful fetch.
    fetched_at: Instant,
    /// The last fetch, successful or not: the rate limit counts from here.
    attempted_at: Instant,
    last_error: Option<String>,
}

enum Fetcher {
    File(PathBuf),
    Http { client: reqwest::Client, url: reqwest::Url },
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("request failed: {0}")]
    Http(reqwest::Error),
    #[error("http status {0}")]
    Status(u16),
    #[error("the jwks is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error(transparent)]
    Jwks(#[from] JwksError),
}

impl From<reqwest::Error> for FetchError {
    fn from(e: reqwest::Error) -> Self {
        Self::Http(e.without_url())
    }
}

impl KeyStore {
    /// Builds the store and loads the JWKS once; any failure is a start-up error.
    pub(crate) async fn load(source: &JwksSource) -> Result<Arc<Self>, ConfigError> {
        let (fetcher, refresh, min_refetch) = match source {
            JwksSource::File(path) => (Fetcher::File(path.clone()), None, DEFAULT_MIN_REFETCH),
            JwksSource::Url { url, refresh, min_refetch } => {
                let url = check_url(url)?;
                (Fetcher::Http { client: http_client()?, url }, Some(*refresh), *min_refetch)
            }
        };
        let location = source.location();
        let now = Instant::now();
        let store = Self {
            fetcher,
            location: location.clone(),
            refresh,
            min_refetch,
            state: Mutex::new(State {
                keys: Arc::new(KeySet::default()),
                fetched_at: now,
                attempted_at: now,
                last_error: None,
            }),
            fetch_lock: tokio::sync::Mutex::new(()),
            refreshing: AtomicBool::new(false),
        };
        let keys = store.fetch().await.map_err(|e| ConfigError::JwksUnavailable { location, reason: e.to_string() })?;
        {
            let mut state = store.state();
            let now = Instant::now();
            state.keys = Arc::new(keys);
            state.fetched_at = now;
            state.attempted_at = now;
        }
        Ok(Arc::new(store))
    }

    pub(crate) fn location(&self) -> &str {
        &self.location
    }

    /// The keys as last fetched.
    pub(crate) fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.state().keys)
    }

    /// Why the last fetch failed, if it did.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.state().last_error.clone()
    }

    /// Fetches the JWKS again unless a fetch happened less than `min_refetch` ago, and returns the
    /// keys then current. Concurrent callers wait for one fetch.
    pub(crate) async fn refetch(&self) -> Arc<KeySet> {
        let _single_flight = self.fetch_lock.lock().await;
        if self.state().attempted_at.elapsed() >= self.min_refetch {
            self.fetch_and_store().await;
        }
        self.current()
    }

    /// Spawns a background refresh when the keys are older than `refresh` (and the rate limit
    /// allows a fetch); the caller goes on with the current keys.
    pub(crate) fn refresh_if_stale(self: &Arc<Self>) {
        let Some(refresh) = self.refresh else { return };
        {
            let state = self.state();
            if state.fetched_at.elapsed() < refresh || state.attempted_at.elapsed() < self.min_refetch {
                return;
            }
        }
        // Outside a Tokio runtime there is nothing to spawn on: the refetch on an unknown key
        // still keeps the keys current.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = Arc::clone(self);
        runtime.spawn(async move {
            let _clear = ClearOnDrop(&store.refreshing);
            let _single_flight = store.fetch_lock.lock().await;
            if store.state().attempted_at.elapsed() >= store.min_refetch {
                store.fetch_and_store().await;
            }
        });
    }

    async fn fetch_and_store(&self) {
        let result = self.fetch().await;
        let mut state = self.state();
        let now = Instant::now();
        state.attempted_at = now;
        match result {
            Ok(keys) => {
                info!(location = %self.location, keys = keys.len(), "jwks fetched");
                if keys.is_empty() {
                    warn!(location = %self.location, "jwks has no usable key");
                }
                state.keys = Arc::new(keys);
                state.fetched_at = now;
                state.last_error = None;
            }
            Err(e) => {
                warn!(location = %self.location, error = %e, "jwks fetch failed, keeping the previous keys");
                state.last_error = Some(e.to_string());
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, FetchError> {
        let bytes = match &self.fetcher {
            Fetcher::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_capped(&path))
                    .await
                    .map_err(|e| FetchError::Io(std::io::Error::other(e.to_string())))??
            }
            Fetcher::Http { client, url } => get_capped(client, url).await?,
        };
        Ok(KeySet::parse(&bytes)?)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn http_client() -> Result<reqwest::Client, ConfigError> {
    // Follow a few redirects, never to plain http outside loopback.
    let redirects = reqwest::redirect::Policy::custom(|attempt| {
        let secure = attempt.url().scheme() == "https" || is_loopback(attempt.url());
        if attempt.previous().len() >= MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else if !secure {
            attempt.error("refusing a redirect to plain http")
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(redirects)
        .user_agent(concat!("fhirmesh/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ConfigError::HttpClient(e.to_string()))
}

async fn get_capped(client: &reqwest::Client, url: &reqwest::Url) -> Result<Vec<u8>, FetchError> {
    let mut response = client
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/jwk-set+json, application/json")
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status().as_u16()));
    }
    if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
        return Err(FetchError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn read_capped(path: &Path) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    std::fs::File::open(path)?.take(MAX_JWKS_BYTES as u64 + 1).read_to_end(&mut body)?;
    if body.len() > MAX_JWKS_BYTES {
        return Err(FetchError::TooLarge);
    }
    Ok(body)
}
