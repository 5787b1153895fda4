//! `fhirmesh bench`, `fhirmesh load` and `fhirmesh export`: the command-line faces of
//! `fhirmesh-bench`. They talk HTTP to any FHIR base URL and stop by themselves.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fhirmesh_bench::bench::{self, BenchConfig, Scenario};
use fhirmesh_bench::client::BaseUrl;
use fhirmesh_bench::export::{self, ExportOptions, ExportTarget};
use fhirmesh_bench::load::{self, LoadConfig, Source, SyntheticConfig};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// FHIR base URL to measure (http only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Scenario to run, repeatable or comma-separated: all, read, create, update, search-token,
    /// search-string, search-chain, search-include, transaction-100, history, mixed, index-lag,
    /// rest-hook, export.
    #[arg(long = "scenario", value_delimiter = ',', default_value = "all")]
    pub scenarios: Vec<String>,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// How long each scenario runs (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// At most this many requests per scenario.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Patients (with 2 Observations each) created before the scenarios run.
    #[arg(long, default_value_t = 1000)]
    pub patients: usize,
    /// Skip the bare-hyper baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Seed of the scenarios' random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// FHIR base URL to load into (http only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Generate this many synthetic patients (with encounters, observations, conditions,
    /// medication requests; deterministic for a seed) instead of, or besides, FILES.
    #[arg(long, value_name = "PATIENTS")]
    pub synthetic: Option<usize>,
    /// Seed of the synthetic generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Entries per batch Bundle when loading NDJSON.
    #[arg(long, default_value_t = 500)]
    pub bundle_size: usize,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Files or directories: transaction/batch Bundles (.json) and NDJSON (.ndjson), e.g. Synthea
    /// output or a bulk export.
    pub files: Vec<PathBuf>,
}

/// `10s`, `500ms`, `2m`, or a number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number.parse().map_err(|_| format!("'{text}' is not a duration like 10s or 500ms"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("'{text}': use ms, s or m")),
    };
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
        return Err(format!("'{text}' must be more than 0 and at most an hour"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")
}

pub fn run_bench(args: &BenchArgs) -> Result<()> {
    let mut scenarios = Vec::new();
    for name in &args.scenarios {
        for scenario in Scenario::parse(name)? {
            if !scenarios.contains(&scenario) {
                scenarios.push(scenario);
            }
        }
    }
    let config = BenchConfig {
        base: BaseUrl::parse(&args.url)?,
        scenarios,
        connections: args.connections,
        duration: args.duration,
        max_requests: args.requests,
        patients: args.patients.max(1),
        baseline: !args.no_baseline,
        seed: args.seed,
    };
    let report = runtime()?.block_on(bench::run(config))?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        write_json(path, &report.to_json())?;
    }
    if report.scenarios.iter().any(|row| row.errors > 0) {
        bail!("some requests failed (see the errors column)");
    }
    Ok(())
}

pub fn run_load(args: &LoadArgs) -> Result<()> {
    let mut sources = Vec::new();
    if let Some(patients) = args.synthetic {
        sources.push(Source::Synthetic(SyntheticConfig { seed: args.seed, patients }));
    }
    if !args.files.is_empty() {
        sources.push(Source::Files(args.files.clone()));
    }
    if sources.is_empty() {
        bail!("nothing to load: give --synthetic PATIENTS and/or files");
    }
    let base = BaseUrl::parse(&args.url)?;
    let runtime = runtime()?;
    let mut failed = false;
    for source in sources {
        let config = LoadConfig {
            base: base.clone(),
            source,
            concurrency: args.concurrency.max(1),
            bundle_size: args.bundle_size.max(1),
            progress: !args.no_progress,
        };
        let summary = runtime.block_on(load::run(config))?;
        println!("{summary}");
        if let Some(path) = &args.json {
            write_json(path, &summary.to_json())?;
        }
        failed |= summary.errors > 0;
    }
    if failed {
        bail!("some resources were not loaded (see the errors above)");
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// FHIR base URL to export from (http or https).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// system, patient, or group:<id>.
    #[arg(long, default_value = "system", value_parser = ExportTarget::parse)]
    pub level: ExportTarget,
    /// Resource types (`_type`), repeatable or comma-separated.
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Only resources updated after this FHIR instant (`_since`).
    #[arg(long)]
    pub since: Option<String>,
    /// A `Type?search` each exported resource of that type must match (`_typeFilter`), repeatable.
    #[arg(long = "type-filter")]
    pub type_filters: Vec<String>,
    /// Elements to keep (`_elements`), `name` or `Type.name`, repeatable or comma-separated.
    #[arg(long = "elements", value_delimiter = ',')]
    pub elements: Vec<String>,
    /// Bearer token for every request (or FHIRMESH_EXPORT_TOKEN).
    #[arg(long, env = "FHIRMESH_EXPORT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Directory for the NDJSON files and manifest.json.
    #[arg(long, default_value = "export")]
    pub out: PathBuf,
    /// Shortest pause between status polls (the server's Retry-After may ask for more).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub poll: Duration,
    /// Give up, and cancel the export, after this long (e.g. 30m).
    #[arg(long, default_value = "60m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// No progress display.
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run_export(args: &ExportArgs) -> Result<()> {
    let options = ExportOptions {
        base_url: args.url.clone(),
        level: args.level.clone(),
        types: args.types.clone(),
        since: args.since.clone(),
        type_filters: args.type_filters.clone(),
        elements: args.elements.clone(),
        token: args.token.clone(),
        out: args.out.clone(),
        poll_interval: args.poll,
        timeout: args.timeout,
        progress: !args.no_progress,
    };
    let summary = runtime()?.block_on(export::run(&options))?;
    println!(
        "exported {} resources in {} files ({} bytes) to {} in {:.1} s (transactionTime {})",
        summary.resources,
        summary.files,
        summary.bytes,
        args.out.display(),
        summary.seconds,
        summary.transaction_time.as_deref().unwrap_or("?"),
    );
    Ok(())
}

fn write_json(path: &PathBuf, value: &serde_json::Value) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
