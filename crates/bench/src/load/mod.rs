//! Seeded synthetic data and file loading (`fhirmesh load`).
//!
//! [`run`] sends work to `POST /` (the FHIR base) as transaction or batch Bundles with
//! `Prefer: return=minimal`, from `concurrency` workers that each own one kept-alive
//! [`Connection`] and pull from one bounded queue:
//!
//! - [`Source::Synthetic`]: first [`synthetic_directory`] alone (the Organizations and
//!   Practitioners, `PUT` with stable ids), then one transaction per patient,
//!   [`synthetic_patient_bundle`]`(seed, 0..patients)`.
//! - [`Source::Files`]: JSON Bundles (transaction or batch) as they are; NDJSON files (one resource a
//!   line) in batch Bundles of `bundle_size` entries, `PUT Type/id` when a resource has an id and
//!   `POST Type` otherwise; a JSON file holding one other resource as a one-entry batch. A
//!   directory stands for every `*.json`/`*.ndjson`/`*.jsonl` directly in it, sorted.
//!
//! The run ends when the input is used up. Failures do not stop it: a non-2xx response, a
//! batch-response entry that is not 2xx, a request that could not be sent, and an input that
//! cannot be loaded (a malformed NDJSON line, named `file:line`) each count one error, and the
//! first [`MAX_REPORTED_ERRORS`] are kept with a bounded excerpt of the server's
//! OperationOutcome. Only set-up failures (a missing input file, no connection to the server at
//! all) make [`run`] return `Err`.

mod files;
mod synthetic;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Method, StatusCode};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::client::{BaseUrl, Connection, Response};

pub use synthetic::{
    ORGANIZATIONS, PRACTITIONERS, REFERENCE_DATE, SYNTHETIC_IDENTIFIER_SYSTEM, SYNTHETIC_MRN_SYSTEM,
    synthetic_directory, synthetic_patient_bundle, synthetic_patient_entries,
};

/// How many error messages a [`LoadSummary`] keeps.
pub const MAX_REPORTED_ERRORS: usize = 10;
/// Longest excerpt of a server's diagnostics in an error message, in characters.
const MAX_EXCERPT: usize = 300;
/// The `Prefer` header of every request: the loader only needs statuses.
const PREFER: &str = "return=minimal";
/// The progress bar: position = resources sent (loaded or failed), with rate and ETA; the message
/// counts errors.
const PROGRESS_TEMPLATE: &str =
    "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} resources ({per_sec}, ETA {eta}) {msg}";

/// The synthetic data set: patients `0..patients` of `seed`, after the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticConfig {
    pub seed: u64,
    pub patients: usize,
}

/// What to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Synthetic(SyntheticConfig),
    /// JSON Bundles, NDJSON files, or directories of them.
    Files(Vec<PathBuf>),
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub base: BaseUrl,
    pub source: Source,
    /// Workers, each with its own connection (at least 1).
    pub concurrency: usize,
    /// Entries per batch Bundle made from NDJSON (at least 1). Bundles and synthetic patients are
    /// sent whole.
    pub bundle_size: usize,
    /// Draw a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

impl LoadConfig {
    /// 8 workers, batches of 100, no progress bar.
    pub fn new(base: BaseUrl, source: Source) -> LoadConfig {
        LoadConfig { base, source, concurrency: 8, bundle_size: 100, progress: false }
    }
}

/// What a load did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadSummary {
    /// Resources the server accepted (2xx entries).
    pub resources: u64,
    /// HTTP requests sent.
    pub requests: u64,
    /// Failed requests, failed entries, and inputs that could not be loaded.
    pub errors: u64,
    /// From the first request to the last response (planning and connecting excluded).
    pub elapsed: Duration,
    /// The first [`MAX_REPORTED_ERRORS`] error messages.
    pub first_errors: Vec<String>,
    /// The highest `X-Consistency-Token` the server returned (fhirmesh: send it with a search to
    /// wait until the search index has caught up with this load).
    pub consistency_token: Option<u64>,
}

impl LoadSummary {
    pub fn resources_per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 { self.resources as f64 / seconds } else { 0.0 }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "resources": self.resources,
            "requests": self.requests,
            "errors": self.errors,
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "resources_per_second": self.resources_per_second(),
            "first_errors": self.first_errors,
            "consistency_token": self.consistency_token,
        })
    }
}

impl fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "loaded {} resources in {} requests in {:.2} s ({:.0} resources/s), {} error{}",
            self.resources,
            self.requests,
            self.elapsed.as_secs_f64(),
            self.resources_per_second(),
            self.errors,
            if self.errors == 1 { "" } else { "s" }
        )?;
        if !self.first_errors.is_empty() {
            let shown = self.first_errors.len() as u64;
            write!(f, "\nfirst {shown} error{}:", if shown == 1 { "" } else { "s" })?;
            for message in &self.first_errors {
                write!(f, "\n  {message}")?;
            }
        }
        Ok(())
    }
}

/// One request's worth of work: a Bundle to POST to the base.
pub(crate) struct Work {
    /// Where it came from, for messages: `patient 17`, `data.ndjson:1-100`, `bundle.json`.
    label: String,
    body: Bytes,
    /// Entries in the Bundle.
    entries: usize,
    /// Per entry, where it came from (`data.ndjson:17`); `{label} entry {i}` when absent.
    entry_labels: Option<Vec<String>>,
}

impl Work {
    fn entry_label(&self, index: usize) -> String {
        match self.entry_labels.as_ref().and_then(|labels| labels.get(index)) {
            Some(label) => label.clone(),
            None => format!("{} entry {index}", self.label),
        }
    }
}

fn synthetic_work(label: String, bundle: &Value) -> Work {
    let entries = bundle["entry"].as_array().map_or(0, Vec::len);
    Work { label, body: Bytes::from(bundle.to_string()), entries, entry_labels: None }
}

/// Counters shared by the workers and the producer.
#[derive(Default)]
struct Tally {
    resources: u64,
    requests: u64,
    errors: u64,
    first_errors: Vec<String>,
    consistency_token: Option<u64>,
}

struct Shared {
    tally: Mutex<Tally>,
    progress: ProgressBar,
}

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut Tally) -> T) -> T {
        f(&mut self.tally.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn error(&self, message: String) {
        tracing::debug!(%message, "load error");
        let errors = self.with(|tally| {
            tally.errors += 1;
            if tally.first_errors.len() < MAX_REPORTED_ERRORS {
                tally.first_errors.push(message);
            }
            tally.errors
        });
        self.progress.set_message(format!("{errors} error{}", if errors == 1 { "" } else { "s" }));
    }
}

/// How a response went: resources loaded and error messages.
#[derive(Debug, Default, PartialEq)]
struct Assessment {
    loaded: u64,
    errors: Vec<String>,
}

#[derive(Deserialize)]
struct ResponseBundle {
    #[serde(default)]
    entry: Vec<ResponseEntry>,
}

#[derive(Deserialize)]
struct ResponseEntry {
    response: Option<EntryResponse>,
}

#[derive(Deserialize)]
struct EntryResponse {
    status: Option<String>,
    outcome: Option<Value>,
}

/// Judges the response to `work`: a non-2xx status fails the whole request (one error); a 2xx
/// transaction/batch-response fails each entry whose `response.status` is not 2xx. A 2xx body that
/// is not a Bundle counts every entry as loaded.
fn assess(work: &Work, status: StatusCode, body: &[u8]) -> Assessment {
    if !status.is_success() {
        let entries = work.entries;
        let detail = diagnostics_of_body(body);
        let message = format!(
            "{}: {status}{}{detail} ({entries} resource{} not loaded)",
            work.label,
            if detail.is_empty() { "" } else { ": " },
            if entries == 1 { "" } else { "s" }
        );
        return Assessment { loaded: 0, errors: vec![message] };
    }
    let Ok(bundle) = serde_json::from_slice::<ResponseBundle>(body) else {
        return Assessment { loaded: work.entries as u64, errors: Vec::new() };
    };
    let mut assessment = Assessment::default();
    for index in 0..work.entries {
        let response = bundle.entry.get(index).and_then(|entry| entry.response.as_ref());
        let entry_status = response.and_then(|r| r.status.as_deref()).unwrap_or("");
        if entry_status.is_empty() || entry_status.starts_with('2') {
            assessment.loaded += 1;
        } else {
            let detail = response.and_then(|r| r.outcome.as_ref()).map(diagnostics).unwrap_or_default();
            assessment.errors.push(format!(
                "{}: {entry_status}{}{detail}",
                work.entry_label(index),
                if detail.is_empty() { "" } else { ": " }
            ));
        }
    }
    assessment
}

/// The diagnostics of an OperationOutcome body, or a bounded excerpt of any other body.
fn diagnostics_of_body(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(outcome) if outcome["resourceType"] == "OperationOutcome" => diagnostics(&outcome),
        _ => files::excerpt(String::from_utf8_lossy(body).trim(), MAX_EXCERPT),
    }
}

/// `diagnostics (at expression)` of each issue, `; `-separated, at most [`MAX_EXCERPT`] characters.
fn diagnostics(outcome: &Value) -> String {
    let issues = outcome["issue"].as_array().into_iter().flatten();
    let parts: Vec<String> = issues
        .map(|issue| {
            let text = issue["diagnostics"]
                .as_str()
                .or_else(|| issue["details"]["text"].as_str())
                .or_else(|| issue["code"].as_str())
                .unwrap_or("(no diagnostics)");
            match issue["expression"][0].as_str() {
                Some(at) => format!("{text} (at {at})"),
                None => text.to_owned(),
            }
        })
        .collect();
    files::excerpt(&parts.join("; "), MAX_EXCERPT)
}

/// Sends one Bundle on `slot`'s connection (opening a new one when the last failed) and records
/// the outcome.
async fn process(base: &BaseUrl, slot: &mut Option<Connection>, work: Work, shared: &Shared) {
    let connection = match slot {
        Some(connection) => connection,
        None => match Connection::open(base).await {
            Ok(connection) => slot.insert(connection),
            Err(err) => {
                shared.error(format!("{}: {err:#} ({} resources not loaded)", work.label, work.entries));
                shared.progress.inc(work.entries as u64);
                return;
            }
        },
    };
    shared.with(|tally| tally.requests += 1);
    let result = connection.send(Method::POST, "", Some(work.body.clone()), Some(PREFER)).await;
    match result {
        Ok(response) => record(&work, &response, shared),
        Err(err) => {
            *slot = None;
            shared.error(format!("{}: request failed: {err:#} ({} resources not loaded)", work.label, work.entries));
        }
    }
    shared.progress.inc(work.entries as u64);
}

fn record(work: &Work, response: &Response, shared: &Shared) {
    let assessment = assess(work, response.status, &response.body);
    let token = response.consistency_token.as_deref().and_then(|t| t.trim().parse::<u64>().ok());
    shared.with(|tally| {
        tally.resources += assessment.loaded;
        if token > tally.consistency_token {
            tally.consistency_token = token;
        }
    });
    for message in assessment.errors {
        shared.error(message);
    }
}

fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(ProgressStyle::with_template(PROGRESS_TEMPLATE).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// What the producer thread makes: the synthetic patients or the planned files.
enum Input {
    Synthetic(SyntheticConfig),
    Files(Vec<files::PlannedFile>),
}

/// Loads `config.source` into the server at `config.base`; see the module documentation.
pub async fn run(config: LoadConfig) -> Result<LoadSummary> {
    if config.concurrency == 0 {
        bail!("concurrency must be at least 1");
    }
    if config.bundle_size == 0 {
        bail!("bundle size must be at least 1");
    }
    let (input, total) = match &config.source {
        Source::Synthetic(synthetic) => {
            let seed = synthetic.seed;
            let patients: usize = (0..synthetic.patients).map(|i| synthetic_patient_entries(seed, i)).sum();
            (Input::Synthetic(synthetic.clone()), ORGANIZATIONS + PRACTITIONERS + patients)
        }
        Source::Files(paths) => {
            let paths = paths.clone();
            let planned =
                tokio::task::spawn_blocking(move || files::plan(&paths)).await.context("planning failed")??;
            let total = planned.iter().map(|file| file.kind.resources()).sum();
            (Input::Files(planned), total)
        }
    };
    let mut connections = Vec::with_capacity(config.concurrency);
    for _ in 0..config.concurrency {
        connections.push(Some(Connection::open(&config.base).await?));
    }

    let shared =
        Arc::new(Shared { tally: Mutex::new(Tally::default()), progress: progress_bar(config.progress, total as u64) });
    let started = Instant::now();

    // The directory first, alone: every patient refers to it.
    if let Input::Synthetic(synthetic) = &input {
        let directory = synthetic_work("directory".into(), &synthetic_directory(synthetic.seed));
        process(&config.base, &mut connections[0], directory, &shared).await;
    }

    let (sender, receiver) = mpsc::channel::<Work>(config.concurrency * 2);
    let producer = {
        let shared = Arc::clone(&shared);
        let bundle_size = config.bundle_size;
        tokio::task::spawn_blocking(move || match input {
            Input::Synthetic(synthetic) => {
                for index in 0..synthetic.patients {
                    let bundle = synthetic_patient_bundle(synthetic.seed, index);
                    if sender.blocking_send(synthetic_work(format!("patient {index}"), &bundle)).is_err() {
                        return;
                    }
                }
            }
            Input::Files(planned) => files::produce(&planned, bundle_size, &mut |produced| match produced {
                files::Produced::Work(work) => sender.blocking_send(work).is_ok(),
                files::Produced::Error(message, resources) => {
                    shared.error(message);
                    shared.progress.inc(resources as u64);
                    true
                }
            }),
        })
    };

    let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
    let mut workers = tokio::task::JoinSet::new();
    for mut slot in connections {
        let (receiver, shared, base) = (Arc::clone(&receiver), Arc::clone(&shared), config.base.clone());
        workers.spawn(async move {
            loop {
                let next = receiver.lock().await.recv().await;
                let Some(work) = next else { break };
                process(&base, &mut slot, work, &shared).await;
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.context("a load worker failed")?;
    }
    producer.await.context("the load producer failed")?;
    let elapsed = started.elapsed();
    shared.progress.finish();

    let tally = std::mem::take(&mut *shared.tally.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(LoadSummary {
        resources: tally.resources,
        requests: tally.requests,
        errors: tally.errors,
        elapsed,
        first_errors: tally.first_errors,
        consistency_token: tally.consistency_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(entries: usize, labels: Option<Vec<String>>) -> Work {
        Work { label: "input".into(), body: Bytes::new(), entries, entry_labels: labels }
    }

    #[test]
    fn a_failed_request_is_one_error_with_its_diagnostics() {
        let outcome = json!({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "structure", "diagnostics": "unknown element 'foo'", "expression": ["Patient.foo"]},
            {"severity": "error", "code": "required"}
        ]});
        let assessment = assess(&work(3, None), StatusCode::BAD_REQUEST, outcome.to_string().as_bytes());
        assert_eq!(assessment.loaded, 0);
        assert_eq!(
            assessment.errors,
            vec!["input: 400 Bad Request: unknown element 'foo' (at Patient.foo); required (3 resources not loaded)"]
        );
        let long = "x".repeat(5000);
        let assessment = assess(&work(1, None), StatusCode::BAD_GATEWAY, long.as_bytes());
        assert!(assessment.errors[0].chars().count() < MAX_EXCERPT + 100, "{}", assessment.errors[0]);
    }

    #[test]
    fn batch_entries_are_judged_one_by_one() {
        let body = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"response": {"status": "201 Created"}},
            {"response": {"status": "400 Bad Request", "outcome": {"resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "value", "diagnostics": "bad date"}]}}},
            {"response": {"status": "200 OK"}}
        ]});
        let labels = Some(vec!["f:1".into(), "f:2".into(), "f:4".into()]);
        let assessment = assess(&work(3, labels), StatusCode::OK, body.to_string().as_bytes());
        assert_eq!(assessment, Assessment { loaded: 2, errors: vec!["f:2: 400 Bad Request: bad date".into()] });
        let assessment = assess(&work(2, None), StatusCode::OK, body.to_string().as_bytes());
        assert_eq!(assessment.errors, vec!["input entry 1: 400 Bad Request: bad date".to_owned()]);
        // A server answering something else than a Bundle: the request succeeded, so did its entries.
        assert_eq!(assess(&work(4, None), StatusCode::OK, b"").loaded, 4);
    }

    #[test]
    fn the_progress_template_is_valid() {
        assert!(ProgressStyle::with_template(PROGRESS_TEMPLATE).is_ok());
        let bar = progress_bar(true, 10);
        bar.inc(3);
        assert_eq!(bar.position(), 3);
        bar.finish();
        assert!(progress_bar(false, 10).is_hidden());
    }

    #[test]
    fn summaries() {
        let summary = LoadSummary {
            resources: 1000,
            requests: 10,
            errors: 1,
            elapsed: Duration::from_millis(500),
            first_errors: vec!["patient 3: 400 Bad Request".into()],
            consistency_token: Some(42),
        };
        assert_eq!(summary.resources_per_second(), 2000.0);
        assert_eq!(summary.to_json()["resources_per_second"], 2000.0);
        assert_eq!(summary.to_json()["first_errors"][0], "patient 3: 400 Bad Request");
        let text = summary.to_string();
        assert!(
            text.starts_with("loaded 1000 resources in 10 requests in 0.50 s (2000 resources/s), 1 error\n"),
            "{text}"
        );
        assert!(text.contains("\n  patient 3: 400 Bad Request"), "{text}");
        assert_eq!(LoadSummary::default().resources_per_second(), 0.0);
    }
}
