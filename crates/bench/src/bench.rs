//! Named, bounded benchmark scenarios (`fhirmesh bench`) against any FHIR base URL.
//!
//! Each scenario runs `connections` workers, each on its own kept-alive connection, for a fixed
//! duration or request budget (whichever ends first — a run always stops by itself), records every
//! request's latency in an HDR histogram, and reports throughput and p50/p90/p99/max. A `baseline`
//! run measures a bare hyper server answering a fixed 1 KB JSON body with the same client in the
//! same process, so every figure can be read as a ratio to what the machine and client can do at
//! all. The scenarios' data (Patients with Observations and an Organization) is created once, in a
//! set-up phase, through transactions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::client::{BaseUrl, Connection, Response};

/// Identifier system of the Patients the set-up phase creates.
pub const BENCH_IDENTIFIER_SYSTEM: &str = "urn:fhirmesh:bench";
/// Family names of set-up Patients are `Bench0`…`Bench{FAMILIES-1}`: a string search matches
/// `patients / FAMILIES` of them.
const FAMILIES: usize = 50;

/// A named scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// `GET /Patient/{id}` of a random set-up Patient.
    Read,
    /// `POST /Patient` (small body).
    Create,
    /// `PUT /Patient/{id}` of a random set-up Patient (unconditional).
    Update,
    /// `GET /Patient?identifier=urn:fhirmesh:bench|N`: 1 hit.
    SearchToken,
    /// `GET /Patient?family=BenchK`: `patients / 50` hits, first page of 20.
    SearchString,
    /// `GET /Observation?subject:Patient.identifier=urn:fhirmesh:bench|N`: a chain, 2 hits.
    SearchChain,
    /// `GET /Observation?subject=Patient/{id}&_include=Observation:subject`.
    SearchInclude,
    /// `POST /` with a 100-entry transaction (50 Patients, 50 Observations linked by urn:uuid).
    Transaction100,
    /// `GET /Patient/{id}/_history`.
    History,
    /// Read 50 %, token search 25 %, create 15 %, update 10 %.
    Mixed,
    /// Create a Patient, then search for it by identifier until it is found: the latency is
    /// write → visible to search.
    IndexLag,
    /// Create an Observation matching one of `REST_HOOK_SUBSCRIPTIONS` rest-hook Subscriptions
    /// (set up to call a receiver in this process): the latency is write → callback received.
    /// The server must allow `http://127.0.0.1` endpoints (fhirmesh: `notifier.allow_endpoints`).
    RestHook,
    /// One Bulk Data export at a time of the set-up data (`$export?_type=Patient,Observation,
    /// Organization`): kick-off, status polls every 10 ms, every file downloaded. The latency is
    /// kick-off → last file read; the report adds resources exported per second.
    Export,
}

/// Active rest-hook Subscriptions during the `rest-hook` scenario (each write matches one).
pub const REST_HOOK_SUBSCRIPTIONS: usize = 100;

impl Scenario {
    pub const ALL: [Scenario; 13] = [
        Scenario::Read,
        Scenario::Create,
        Scenario::Update,
        Scenario::SearchToken,
        Scenario::SearchString,
        Scenario::SearchChain,
        Scenario::SearchInclude,
        Scenario::Transaction100,
        Scenario::History,
        Scenario::Mixed,
        Scenario::IndexLag,
        Scenario::RestHook,
        Scenario::Export,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Read => "read",
            Scenario::Create => "create",
            Scenario::Update => "update",
            Scenario::SearchToken => "search-token",
            Scenario::SearchString => "search-string",
            Scenario::SearchChain => "search-chain",
            Scenario::SearchInclude => "search-include",
            Scenario::Transaction100 => "transaction-100",
            Scenario::History => "history",
            Scenario::Mixed => "mixed",
            Scenario::IndexLag => "index-lag",
            Scenario::RestHook => "rest-hook",
            Scenario::Export => "export",
        }
    }

    pub fn parse(name: &str) -> Result<Vec<Scenario>> {
        if name == "all" {
            return Ok(Scenario::ALL.to_vec());
        }
        Scenario::ALL.into_iter().find(|s| s.name() == name).map(|s| vec![s]).with_context(|| {
            let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
            format!("unknown scenario '{name}'; known: all, {}", names.join(", "))
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub base: BaseUrl,
    pub scenarios: Vec<Scenario>,
    /// Concurrent connections (one worker each).
    pub connections: usize,
    /// How long each scenario runs at most.
    pub duration: Duration,
    /// Requests per scenario at most (all workers together).
    pub max_requests: Option<u64>,
    /// Patients (each with 2 Observations) the set-up phase creates.
    pub patients: usize,
    /// Also measure the bare-hyper baseline.
    pub baseline: bool,
    /// Seeds the workers' choices, so two runs ask for the same things.
    pub seed: u64,
}

/// One scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: String,
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Throughput as a fraction of the baseline's (when the baseline ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_baseline: Option<f64>,
    /// How long the server took, before the scenario, to finish indexing what earlier scenarios
    /// wrote (see [`settle`]).
    pub settle_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Resources exported per second (the `export` scenario).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources_per_second: Option<f64>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub base_url: String,
    pub connections: usize,
    pub duration_seconds: f64,
    pub max_requests: Option<u64>,
    pub patients: usize,
    pub cores: usize,
    pub memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<ScenarioReport>,
    pub scenarios: Vec<ScenarioReport>,
}

impl Report {
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// A fixed-width table, one row per scenario (baseline first).
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} connections, {:.1} s per scenario{}, {} set-up Patients, {} cores, {} MiB\n",
            self.connections,
            self.duration_seconds,
            self.max_requests.map(|n| format!(" or {n} requests")).unwrap_or_default(),
            self.patients,
            self.cores,
            self.memory_mib.map_or_else(|| "?".to_owned(), |m| m.to_string()),
        );
        out.push_str(&format!(
            "{:<16} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}\n",
            "scenario", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "×baseline", "settle s"
        ));
        for row in self.baseline.iter().chain(&self.scenarios) {
            out.push_str(&format!(
                "{:<16} {:>9} {:>7} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>8.1}\n",
                row.scenario,
                row.requests,
                row.errors,
                row.per_second,
                row.p50_ms,
                row.p90_ms,
                row.p99_ms,
                row.max_ms,
                row.ratio_to_baseline.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}")),
                row.settle_seconds,
            ));
            if let Some(resources) = row.resources_per_second {
                out.push_str(&format!("  resources exported per second: {resources:.0}\n"));
            }
            if let Some(error) = &row.first_error {
                out.push_str(&format!("  first error: {error}\n"));
            }
        }
        out
    }
}

/// The ids the scenarios pick from.
struct Fixture {
    patients: Vec<String>,
    /// Resources the `export` scenario has downloaded.
    exported: std::sync::atomic::AtomicU64,
    /// The receiver of the `rest-hook` scenario, when it runs.
    hooks: Option<HookReceiver>,
}

/// Runs the set-up phase, the baseline (if asked) and every scenario, in order.
pub async fn run(config: BenchConfig) -> Result<Report> {
    if config.connections == 0 {
        bail!("at least one connection is needed");
    }
    let fixture = Arc::new(set_up(&config).await?);
    let baseline = if config.baseline { Some(run_baseline(&config).await?) } else { None };
    let mut scenarios = Vec::new();
    for scenario in &config.scenarios {
        let settled = settle(&config.base).await?;
        let mut report = run_scenario(&config, *scenario, fixture.clone()).await?;
        report.settle_seconds = settled.as_secs_f64();
        if let Some(baseline) = &baseline
            && baseline.per_second > 0.0
        {
            report.ratio_to_baseline = Some(report.per_second / baseline.per_second);
        }
        tracing::info!(scenario = scenario.name(), per_second = report.per_second, "scenario done");
        scenarios.push(report);
    }
    Ok(Report {
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        base_url: format!("http://{}{}", config.base.authority, config.base.path),
        connections: config.connections,
        duration_seconds: config.duration.as_secs_f64(),
        max_requests: config.max_requests,
        patients: config.patients,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        memory_mib: memory_mib(),
        baseline,
        scenarios,
    })
}

/// Longest wait for the server's search index to catch up before a scenario.
const SETTLE_LIMIT: Duration = Duration::from_secs(600);

/// Waits until a search reflects every write made so far, so that a scenario does not pay for the
/// indexing backlog of the one before it. A server whose index lags answers a search with an
/// `outcome` entry saying so (fhirmesh waits up to its consistency bound, about 1 s, per search);
/// a server without one answers the first search and the wait ends at once.
async fn settle(base: &BaseUrl) -> Result<Duration> {
    let started = Instant::now();
    let mut conn = Connection::open(base).await?;
    while started.elapsed() < SETTLE_LIMIT {
        let response = conn.send(Method::GET, "Patient?_count=1&_total=none", None, None).await?;
        check(&response, "settle search")?;
        let bundle: Value = serde_json::from_slice(&response.body).context("a search answer is not JSON")?;
        let lagging =
            bundle["entry"].as_array().into_iter().flatten().any(|entry| entry["search"]["mode"] == "outcome");
        if !lagging {
            return Ok(started.elapsed());
        }
    }
    bail!("the search index did not catch up within {} s", SETTLE_LIMIT.as_secs())
}

/// Total memory from /proc/meminfo (Linux), for the report.
fn memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Creates the Patients (with 2 Observations each, all managed by one Organization) through
/// 50-Patient transactions, and returns their ids.
async fn set_up(config: &BenchConfig) -> Result<Fixture> {
    let mut conn = Connection::open(&config.base).await?;
    let organization = json!({"resourceType": "Organization", "id": "bench-org", "name": "Bench Hospital",
                              "identifier": [{"system": BENCH_IDENTIFIER_SYSTEM, "value": "org"}]});
    let response =
        conn.send(Method::PUT, "Organization/bench-org", Some(bytes(&organization)), Some("return=minimal")).await?;
    check(&response, "set-up Organization")?;
    let mut patients = Vec::with_capacity(config.patients);
    let mut next = 0;
    while next < config.patients {
        let count = (config.patients - next).min(50);
        let bundle = setup_bundle(next, count);
        let response = conn.send(Method::POST, "", Some(bytes(&bundle)), Some("return=minimal")).await?;
        check(&response, "set-up transaction")?;
        let answer: Value = serde_json::from_slice(&response.body).context("set-up response is not JSON")?;
        for entry in answer["entry"].as_array().into_iter().flatten() {
            if let Some(location) = entry["response"]["location"].as_str()
                && let Some(id) = location.strip_prefix("Patient/").and_then(|rest| rest.split('/').next())
            {
                patients.push(id.to_owned());
            }
        }
        next += count;
    }
    if patients.len() != config.patients {
        bail!("set-up created {} Patients, expected {}", patients.len(), config.patients);
    }
    let hooks = match config.scenarios.contains(&Scenario::RestHook) {
        true => Some(HookReceiver::start(&mut conn).await?),
        false => None,
    };
    Ok(Fixture { patients, exported: Default::default(), hooks })
}

fn check(response: &Response, what: &str) -> Result<()> {
    if !response.status.is_success() {
        bail!("{what} failed: {} {}", response.status, excerpt(&response.body));
    }
    Ok(())
}

fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

fn bytes(value: &Value) -> Bytes {
    Bytes::from(value.to_string())
}

/// Patients `first..first+count` (identifier `urn:fhirmesh:bench|N`, family `Bench{N % 50}`), each
/// with 2 heart-rate Observations, as one transaction.
fn setup_bundle(first: usize, count: usize) -> Value {
    let mut entries = Vec::new();
    for n in first..first + count {
        let full_url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
        entries.push(json!({"fullUrl": full_url, "request": {"method": "POST", "url": "Patient"},
            "resource": {"resourceType": "Patient",
                "identifier": [{"system": BENCH_IDENTIFIER_SYSTEM, "value": n.to_string()}],
                "name": [{"family": format!("Bench{}", n % FAMILIES), "given": ["Ada"]}],
                "gender": if n % 2 == 0 { "female" } else { "male" }, "birthDate": "1970-01-01",
                "managingOrganization": {"reference": "Organization/bench-org"}}}));
        for k in 0..2 {
            entries.push(json!({"fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
                "request": {"method": "POST", "url": "Observation"},
                "resource": observation(&full_url, 60 + k)}));
        }
    }
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

fn observation(subject: &str, value: usize) -> Value {
    json!({"resourceType": "Observation", "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
           "subject": {"reference": subject}, "effectiveDateTime": "2024-01-01T10:00:00Z",
           "valueQuantity": {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}})
}

/// 50 Patients and 50 Observations linked by urn:uuid.
fn transaction_100(rng: &mut fastrand::Rng) -> Value {
    let mut entries = Vec::new();
    for _ in 0..50 {
        let full_url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
        entries.push(json!({"fullUrl": full_url, "request": {"method": "POST", "url": "Patient"},
            "resource": {"resourceType": "Patient", "name": [{"family": format!("Tx{}", rng.u32(..1000))}], "gender": "other"}}));
        entries.push(json!({"fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            "request": {"method": "POST", "url": "Observation"}, "resource": observation(&full_url, 70)}));
    }
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// Counters shared by a scenario's workers.
struct Shared {
    started: Instant,
    deadline: Instant,
    budget: Option<u64>,
    issued: AtomicU64,
}

impl Shared {
    /// Starts the clock of a scenario of `config`.
    fn new(config: &BenchConfig) -> Shared {
        let started = Instant::now();
        Shared { started, deadline: started + config.duration, budget: config.max_requests, issued: AtomicU64::new(0) }
    }

    /// Claims the next request, or `false` when time or the budget is up.
    fn claim(&self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        self.budget.is_none_or(|budget| n < budget)
    }
}

struct WorkerResult {
    histogram: Histogram<u64>,
    requests: u64,
    errors: u64,
    first_error: Option<String>,
}

async fn run_scenario(config: &BenchConfig, scenario: Scenario, fixture: Arc<Fixture>) -> Result<ScenarioReport> {
    let shared = Arc::new(Shared::new(config));
    let mut workers = Vec::new();
    // Exports run one at a time (servers limit concurrent exports per client).
    let connections = if scenario == Scenario::Export { 1 } else { config.connections };
    let exported_before = fixture.exported.load(std::sync::atomic::Ordering::Relaxed);
    for worker in 0..connections {
        let (base, shared, fixture) = (config.base.clone(), shared.clone(), fixture.clone());
        let seed = config.seed ^ ((worker as u64 + 1) << 32) ^ scenario as u64;
        workers.push(tokio::spawn(async move {
            let mut conn = Connection::open(&base).await?;
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut result = WorkerResult { histogram: histogram()?, requests: 0, errors: 0, first_error: None };
            while shared.claim() {
                let started = Instant::now();
                let outcome = one_request(&mut conn, scenario, &fixture, &mut rng).await;
                let elapsed = started.elapsed();
                result.requests += 1;
                match outcome {
                    Ok(sample) => record(&mut result.histogram, sample.unwrap_or(elapsed)),
                    Err(error) => {
                        result.errors += 1;
                        result.first_error.get_or_insert_with(|| format!("{error:#}"));
                        if error.downcast_ref::<hyper::Error>().is_some() {
                            conn = Connection::open(&base).await?;
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>(result)
        }));
    }
    let mut histogram = histogram()?;
    let (mut requests, mut errors, mut first_error) = (0, 0, None);
    for worker in workers {
        let result = worker.await.context("benchmark worker panicked")??;
        histogram.add(&result.histogram).context("merging histograms")?;
        requests += result.requests;
        errors += result.errors;
        first_error = first_error.or(result.first_error);
    }
    let seconds = shared.started.elapsed().as_secs_f64();
    let mut report = report(scenario.name(), &histogram, requests, errors, seconds, first_error);
    if scenario == Scenario::Export && seconds > 0.0 {
        let exported = fixture.exported.load(std::sync::atomic::Ordering::Relaxed) - exported_before;
        report.resources_per_second = Some(exported as f64 / seconds);
    }
    Ok(report)
}

fn histogram() -> Result<Histogram<u64>> {
    // 1 µs to 60 s, 3 significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).clamp(1, 60_000_000);
    histogram.saturating_record(micros);
}

fn report(
    name: &str,
    histogram: &Histogram<u64>,
    requests: u64,
    errors: u64,
    seconds: f64,
    first_error: Option<String>,
) -> ScenarioReport {
    let ms = |micros: u64| micros as f64 / 1000.0;
    ScenarioReport {
        scenario: name.to_owned(),
        requests,
        errors,
        seconds,
        per_second: if seconds > 0.0 { (requests - errors) as f64 / seconds } else { 0.0 },
        p50_ms: ms(histogram.value_at_quantile(0.50)),
        p90_ms: ms(histogram.value_at_quantile(0.90)),
        p99_ms: ms(histogram.value_at_quantile(0.99)),
        max_ms: ms(histogram.max()),
        ratio_to_baseline: None,
        settle_seconds: 0.0,
        first_error,
        resources_per_second: None,
    }
}

/// One request of `scenario`; `Ok(Some(latency))` when the sample is not the request's own
/// round trip (index-lag).
async fn one_request(
    conn: &mut Connection,
    scenario: Scenario,
    fixture: &Fixture,
    rng: &mut fastrand::Rng,
) -> Result<Option<Duration>> {
    let patient = |rng: &mut fastrand::Rng| fixture.patients[rng.usize(..fixture.patients.len())].clone();
    let n = |rng: &mut fastrand::Rng| rng.usize(..fixture.patients.len());
    let (method, path, body, expect) = match scenario {
        Scenario::Read => (Method::GET, format!("Patient/{}", patient(rng)), None, StatusCode::OK),
        Scenario::Create => (Method::POST, "Patient".to_owned(), Some(small_patient(rng)), StatusCode::CREATED),
        Scenario::Update => {
            let id = patient(rng);
            let body = json!({"resourceType": "Patient", "id": id, "active": rng.bool(),
                              "name": [{"family": format!("Bench{}", rng.usize(..FAMILIES)), "given": ["Ada"]}]});
            (Method::PUT, format!("Patient/{id}"), Some(bytes(&body)), StatusCode::OK)
        }
        Scenario::SearchToken => {
            (Method::GET, format!("Patient?identifier={BENCH_IDENTIFIER_SYSTEM}%7C{}", n(rng)), None, StatusCode::OK)
        }
        Scenario::SearchString => {
            (Method::GET, format!("Patient?family=Bench{}", rng.usize(..FAMILIES)), None, StatusCode::OK)
        }
        Scenario::SearchChain => (
            Method::GET,
            format!("Observation?subject:Patient.identifier={BENCH_IDENTIFIER_SYSTEM}%7C{}", n(rng)),
            None,
            StatusCode::OK,
        ),
        Scenario::SearchInclude => (
            Method::GET,
            format!("Observation?subject=Patient/{}&_include=Observation:subject", patient(rng)),
            None,
            StatusCode::OK,
        ),
        Scenario::Transaction100 => (Method::POST, String::new(), Some(bytes(&transaction_100(rng))), StatusCode::OK),
        Scenario::History => (Method::GET, format!("Patient/{}/_history", patient(rng)), None, StatusCode::OK),
        Scenario::Mixed => {
            let pick = rng.usize(..100);
            let sub = match pick {
                0..50 => Scenario::Read,
                50..75 => Scenario::SearchToken,
                75..90 => Scenario::Create,
                _ => Scenario::Update,
            };
            return Box::pin(one_request(conn, sub, fixture, rng)).await;
        }
        Scenario::IndexLag => return index_lag(conn).await.map(Some),
        Scenario::Export => {
            let exported = export_once(conn).await?;
            fixture.exported.fetch_add(exported, std::sync::atomic::Ordering::Relaxed);
            return Ok(None);
        }
        Scenario::RestHook => {
            let hooks = fixture.hooks.as_ref().context("the rest-hook receiver was not set up")?;
            return hooks.write_and_wait(conn, rng).await.map(Some);
        }
    };
    let prefer = if body.is_some() { Some("return=minimal") } else { None };
    let response = conn.send(method, &path, body, prefer).await?;
    let ok = response.status == expect || (scenario == Scenario::Update && response.status == StatusCode::CREATED);
    if !ok {
        bail!("{} {path}: {} {}", scenario.name(), response.status, excerpt(&response.body));
    }
    Ok(None)
}

fn small_patient(rng: &mut fastrand::Rng) -> Bytes {
    bytes(
        &json!({"resourceType": "Patient", "name": [{"family": format!("Bench{}", rng.usize(..FAMILIES)), "given": ["Ada"]}],
                  "gender": "female", "birthDate": "1980-05-17"}),
    )
}

/// Creates a Patient with a fresh identifier, then searches for it (without a consistency
/// token) until it is found: write response → first search that finds it.
async fn index_lag(conn: &mut Connection) -> Result<Duration> {
    // Unique across runs against the same server (the seeded generator repeats itself).
    let value = format!("lag-{}", uuid::Uuid::new_v4());
    let body = json!({"resourceType": "Patient", "identifier": [{"system": BENCH_IDENTIFIER_SYSTEM, "value": value}]});
    let created = conn.send(Method::POST, "Patient", Some(bytes(&body)), Some("return=minimal")).await?;
    if created.status != StatusCode::CREATED {
        bail!("index-lag create: {} {}", created.status, excerpt(&created.body));
    }
    let written = Instant::now();
    let path = format!("Patient?identifier={BENCH_IDENTIFIER_SYSTEM}%7C{value}&_total=accurate");
    for _ in 0..2000 {
        let response = conn.send(Method::GET, &path, None, None).await?;
        let found: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        if found["total"].as_u64() == Some(1) {
            return Ok(written.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    bail!("index-lag: the Patient did not become searchable within 2,000 searches")
}

/// One whole export; returns how many resources its files held.
async fn export_once(conn: &mut Connection) -> Result<u64> {
    let kick_off = "$export?_type=Patient,Observation,Organization";
    let response = conn.send(Method::GET, kick_off, None, Some("respond-async")).await?;
    if response.status != StatusCode::ACCEPTED {
        bail!("export kick-off: {} {}", response.status, excerpt(&response.body));
    }
    let status_url = response.content_location.context("the kick-off answer has no Content-Location")?;
    let base = conn.base().clone();
    let status_path = base.relative(&status_url).context("the status URL is not under the base URL")?.to_owned();
    let manifest: Value = loop {
        let response = conn.send(Method::GET, &status_path, None, None).await?;
        match response.status {
            StatusCode::OK => break serde_json::from_slice(&response.body).context("the manifest is not JSON")?,
            StatusCode::ACCEPTED => tokio::time::sleep(Duration::from_millis(10)).await,
            other => bail!("export status: {other} {}", excerpt(&response.body)),
        }
    };
    let mut resources = 0;
    for output in manifest["output"].as_array().into_iter().flatten() {
        let url = output["url"].as_str().context("a manifest output has no url")?;
        let path = base.relative(url).context("a file URL is not under the base URL")?;
        let response = conn.send(Method::GET, path, None, None).await?;
        check(&response, "export download")?;
        resources += response.body.iter().filter(|b| **b == b'\n').count() as u64;
    }
    // Free the server's files at once rather than at expiry.
    let response = conn.send(Method::DELETE, &status_path, None, None).await?;
    check(&response, "export clean-up")?;
    Ok(resources)
}

/// The `rest-hook` scenario's receiver: a hyper server on 127.0.0.1:0 in this process that
/// records when each notification arrives (by the notified resource, from the event id header).
struct HookReceiver {
    arrivals: Arc<Arrivals>,
}

#[derive(Default)]
struct Arrivals {
    at: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    changed: tokio::sync::Notify,
}

impl HookReceiver {
    /// Starts the receiver and subscribes it `REST_HOOK_SUBSCRIPTIONS` times (criteria
    /// `Observation?code=urn:fhirmesh:bench|hook-K`, no payload); returns once every Subscription
    /// is active.
    async fn start(conn: &mut Connection) -> Result<HookReceiver> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.context("binding the rest-hook receiver")?;
        let address = listener.local_addr()?;
        let arrivals = Arc::new(Arrivals::default());
        let recorder = arrivals.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { break };
                let recorder = recorder.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let arrived = Instant::now();
                        let event = request.headers().get("x-fhirmesh-event-id").and_then(|v| v.to_str().ok());
                        // `{tenant}/Observation/{id}/_history/{version}` → `Observation/{id}`.
                        if let Some(key) = event.and_then(|e| e.split_once('/')).map(|(_, rest)| rest)
                            && let Some((resource, _)) = key.split_once("/_history/")
                        {
                            recorder.at.lock().unwrap_or_else(|p| p.into_inner()).insert(resource.to_owned(), arrived);
                            recorder.changed.notify_waiters();
                        }
                        async { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new()))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let endpoint = format!("http://{address}/hook");
        for k in 0..REST_HOOK_SUBSCRIPTIONS {
            let subscription = json!({"resourceType": "Subscription", "status": "requested", "reason": "bench",
                "criteria": format!("Observation?code={BENCH_IDENTIFIER_SYSTEM}|hook-{k}"),
                "channel": {"type": "rest-hook", "endpoint": endpoint}});
            let response =
                conn.send(Method::POST, "Subscription", Some(bytes(&subscription)), Some("return=minimal")).await?;
            check(&response, "set-up Subscription (does the server allow http://127.0.0.1 endpoints?)")?;
        }
        let started = Instant::now();
        loop {
            let response = conn.send(Method::GET, "Subscription?status=active&_summary=count", None, None).await?;
            check(&response, "Subscription count")?;
            let bundle: Value = serde_json::from_slice(&response.body).context("a search answer is not JSON")?;
            if bundle["total"].as_u64().is_some_and(|n| n as usize >= REST_HOOK_SUBSCRIPTIONS) {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the rest-hook Subscriptions did not become active within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(HookReceiver { arrivals })
    }

    /// Creates an Observation one Subscription matches and waits for its callback: the time from
    /// sending the write to the callback's arrival.
    async fn write_and_wait(&self, conn: &mut Connection, rng: &mut fastrand::Rng) -> Result<Duration> {
        let code = format!("hook-{}", rng.usize(..REST_HOOK_SUBSCRIPTIONS));
        let body = json!({"resourceType": "Observation", "status": "final",
                          "code": {"coding": [{"system": BENCH_IDENTIFIER_SYSTEM, "code": code}]}});
        let sent = Instant::now();
        let created = conn.send(Method::POST, "Observation", Some(bytes(&body)), Some("return=minimal")).await?;
        if created.status != StatusCode::CREATED {
            bail!("rest-hook create: {} {}", created.status, excerpt(&created.body));
        }
        let location = created.location.as_deref().context("rest-hook create: no Location")?;
        let key = location.split("/_history/").next().unwrap_or(location);
        let key = key.rsplit_once("Observation/").map(|(_, id)| format!("Observation/{id}")).context("a Location")?;
        let deadline = sent + Duration::from_secs(30);
        loop {
            let changed = self.arrivals.changed.notified();
            if let Some(arrived) = self.arrivals.at.lock().unwrap_or_else(|p| p.into_inner()).remove(&key) {
                return Ok(arrived.saturating_duration_since(sent));
            }
            if tokio::time::timeout_at(deadline.into(), changed).await.is_err() {
                bail!("rest-hook: no callback for {key} within 30 s");
            }
        }
    }
}

/// The bare-hyper baseline: a server on 127.0.0.1:0 in this process answering every request with
/// the same 1 KB JSON body, measured like a scenario.
async fn run_baseline(config: &BenchConfig) -> Result<ScenarioReport> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.context("binding the baseline server")?;
    let address: SocketAddr = listener.local_addr()?;
    let body = Bytes::from(baseline_body());
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { break };
            let body = body.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_request| {
                    let body = body.clone();
                    async move {
                        let mut response = http::Response::new(Full::new(body));
                        response.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/fhir+json"),
                        );
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    let base = BaseUrl::parse(&format!("http://{address}"))?;
    let shared = Arc::new(Shared::new(config));
    let mut workers = Vec::new();
    for _ in 0..config.connections {
        let (base, shared) = (base.clone(), shared.clone());
        workers.push(tokio::spawn(async move {
            let mut conn = Connection::open(&base).await?;
            let mut histogram = histogram()?;
            let mut requests = 0;
            while shared.claim() {
                let started = Instant::now();
                let response = conn.send(Method::GET, "Patient/baseline", None, None).await?;
                if response.status != StatusCode::OK {
                    bail!("baseline answered {}", response.status);
                }
                record(&mut histogram, started.elapsed());
                requests += 1;
            }
            Ok::<_, anyhow::Error>((histogram, requests))
        }));
    }
    let mut histogram = histogram()?;
    let mut requests = 0;
    for worker in workers {
        let (part, count) = worker.await.context("baseline worker panicked")??;
        histogram.add(&part).context("merging histograms")?;
        requests += count;
    }
    let seconds = shared.started.elapsed().as_secs_f64();
    server.abort();
    Ok(report("baseline", &histogram, requests, 0, seconds, None))
}

/// A 1 KB (1,024 bytes) FHIR-looking JSON body.
fn baseline_body() -> Vec<u8> {
    let mut body = json!({"resourceType": "Patient", "id": "baseline", "text": {"status": "generated", "div": ""}})
        .to_string()
        .into_bytes();
    let padding = 1024usize.saturating_sub(body.len());
    let mut value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    value["text"]["div"] = Value::String("x".repeat(padding));
    body = value.to_string().into_bytes();
    body.truncate(1024);
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_round_trip() {
        for scenario in Scenario::ALL {
            assert_eq!(Scenario::parse(scenario.name()).expect("known"), vec![scenario]);
        }
        assert_eq!(Scenario::parse("all").expect("all").len(), Scenario::ALL.len());
        assert!(Scenario::parse("nope").is_err());
    }

    #[test]
    fn the_baseline_body_is_one_kilobyte_of_json() {
        let body = baseline_body();
        assert_eq!(body.len(), 1024);
        assert!(serde_json::from_slice::<Value>(&body).is_ok());
    }

    #[test]
    fn budgets_and_deadlines_stop_workers() {
        let shared = Shared {
            started: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(60),
            budget: Some(3),
            issued: AtomicU64::new(0),
        };
        assert_eq!((0..10).filter(|_| shared.claim()).count(), 3);
        let expired =
            Shared { started: Instant::now(), deadline: Instant::now(), budget: None, issued: AtomicU64::new(0) };
        assert!(!expired.claim());
    }
}
