//! `fhirmesh export`: a Bulk Data Access IG 2.0.0 client for any FHIR server — kick-off, status
//! polls (honouring `Retry-After`, showing `X-Progress`), then every file of the manifest
//! downloaded to a directory, streamed, with the manifest beside them. Bounded by a deadline.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// What to export and where to.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// FHIR base URL (http or https).
    pub base_url: String,
    /// `system`, `patient` or `group:<id>`.
    pub level: ExportTarget,
    /// `_type` entries.
    pub types: Vec<String>,
    /// `_since` (a FHIR instant, passed as given).
    pub since: Option<String>,
    /// `_typeFilter` entries.
    pub type_filters: Vec<String>,
    /// `_elements` entries.
    pub elements: Vec<String>,
    /// A bearer token sent with every request.
    pub token: Option<String>,
    /// The directory the files (and `manifest.json`) go to; created when missing.
    pub out: PathBuf,
    /// The shortest pause between status polls (a server's `Retry-After` may ask for longer, up
    /// to a minute).
    pub poll_interval: Duration,
    /// Give up (and cancel the export) after this long.
    pub timeout: Duration,
    /// Show progress on the terminal.
    pub progress: bool,
}

/// Which kick-off endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportTarget {
    System,
    Patient,
    Group(String),
}

impl ExportTarget {
    pub fn parse(text: &str) -> Result<ExportTarget, String> {
        match text {
            "system" => Ok(ExportTarget::System),
            "patient" => Ok(ExportTarget::Patient),
            other => match other.strip_prefix("group:") {
                Some(id) if !id.is_empty() && !id.contains('/') => Ok(ExportTarget::Group(id.to_owned())),
                _ => Err(format!("'{other}': use system, patient or group:<id>")),
            },
        }
    }

    fn path(&self) -> String {
        match self {
            ExportTarget::System => "$export".to_owned(),
            ExportTarget::Patient => "Patient/$export".to_owned(),
            ExportTarget::Group(id) => format!("Group/{id}/$export"),
        }
    }
}

/// What an export produced.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    pub files: usize,
    /// Resources by type, from the manifest's counts (or the lines read when a count is absent).
    pub resources: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub transaction_time: Option<String>,
    /// Files written, in manifest order.
    pub paths: Vec<PathBuf>,
}

/// The kick-off URL of `options`.
pub fn kick_off_url(options: &ExportOptions) -> String {
    let base = options.base_url.trim_end_matches('/');
    let mut query = form_query(&[
        ("_type", options.types.join(",")),
        ("_since", options.since.clone().unwrap_or_default()),
        ("_elements", options.elements.join(",")),
    ]);
    for filter in &options.type_filters {
        query.extend(form_query(&[("_typeFilter", filter.clone())]));
    }
    let query: Vec<String> = query.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    if query.is_empty() {
        format!("{base}/{}", options.level.path())
    } else {
        format!("{base}/{}?{}", options.level.path(), query.join("&"))
    }
}

/// Non-empty parameters, percent-encoded.
fn form_query(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| ((*k).to_owned(), percent_encode(v))).collect()
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' | b':' => out.push(byte as char),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

/// The OperationOutcome diagnostics of an error answer, or its first bytes.
fn explain(status: reqwest::StatusCode, body: &str) -> String {
    let diagnostics: Option<Vec<String>> = serde_json::from_str::<Value>(body).ok().map(|outcome| {
        outcome["issue"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|issue| issue["diagnostics"].as_str().map(str::to_owned))
            .collect()
    });
    match diagnostics {
        Some(found) if !found.is_empty() => format!("{status}: {}", found.join("; ")),
        _ => format!("{status}: {}", body.chars().take(300).collect::<String>()),
    }
}

/// Runs an export end to end (module documentation).
pub async fn run(options: &ExportOptions) -> Result<ExportSummary> {
    let started = Instant::now();
    let deadline = started + options.timeout;
    let client = reqwest::Client::builder()
        .user_agent(concat!("fhirmesh-export/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot build the HTTP client")?;
    let authorized = |request: reqwest::RequestBuilder| match &options.token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let url = kick_off_url(options);
    let response = authorized(client.get(&url))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .with_context(|| format!("kick-off {url}"))?;
    if response.status() != reqwest::StatusCode::ACCEPTED {
        let status = response.status();
        bail!("the kick-off was refused: {}", explain(status, &response.text().await.unwrap_or_default()));
    }
    let status_url = response
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .context("the kick-off answer has no Content-Location")?;

    let spinner = progress_spinner(options.progress);
    let manifest: Value = loop {
        if Instant::now() > deadline {
            let _ = authorized(client.delete(&status_url)).send().await;
            bail!("the export did not finish within {:?}; it was cancelled", options.timeout);
        }
        let response = authorized(client.get(&status_url)).header("accept", "application/json").send().await?;
        let status = response.status();
        if status == reqwest::StatusCode::OK {
            break response.json().await.context("the manifest is not JSON")?;
        }
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("the export failed: {}", explain(status, &response.text().await.unwrap_or_default()));
        }
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        if let (Some(spinner), Some(progress)) = (&spinner, header("x-progress")) {
            spinner.set_message(progress);
        }
        let asked = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
        let pause = asked.unwrap_or(options.poll_interval).clamp(options.poll_interval, Duration::from_secs(60));
        tokio::time::sleep(pause).await;
    };
    if let Some(spinner) = &spinner {
        spinner.finish_and_clear();
    }

    tokio::fs::create_dir_all(&options.out)
        .await
        .with_context(|| format!("cannot create {}", options.out.display()))?;
    let requires_token = manifest["requiresAccessToken"].as_bool().unwrap_or(false);
    let outputs = manifest["output"].as_array().cloned().unwrap_or_default();
    let bar = progress_bar(options.progress, outputs.len() as u64);
    let mut summary = ExportSummary {
        files: 0,
        resources: 0,
        bytes: 0,
        seconds: 0.0,
        transaction_time: manifest["transactionTime"].as_str().map(str::to_owned),
        paths: Vec::new(),
    };
    for (index, output) in outputs.iter().enumerate() {
        let url = output["url"].as_str().context("a manifest output has no url")?;
        let path = options.out.join(file_name(url, index));
        let request = client.get(url).header("accept", "application/fhir+ndjson");
        let request = if requires_token { authorized(request) } else { request };
        let (bytes, lines) = download(request, &path).await.with_context(|| format!("downloading {url}"))?;
        summary.files += 1;
        summary.bytes += bytes;
        summary.resources += output["count"].as_u64().unwrap_or(lines);
        summary.paths.push(path);
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let manifest_text = serde_json::to_vec_pretty(&manifest).context("manifest")?;
    tokio::fs::write(options.out.join("manifest.json"), manifest_text).await.context("writing manifest.json")?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// A safe local file name for the `index`-th output: the URL's last segment when it is a plain
/// name, else `output-{index}.ndjson`.
fn file_name(url: &str, index: usize) -> String {
    let last = url.split(['?', '#']).next().unwrap_or_default().rsplit('/').next().unwrap_or_default();
    let plain = !last.is_empty()
        && last.len() <= 128
        && !last.starts_with('.')
        && last.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if plain { last.to_owned() } else { format!("output-{}.ndjson", index + 1) }
}

/// Streams a file to `path`; returns (bytes, lines).
async fn download(request: reqwest::RequestBuilder, path: &Path) -> Result<(u64, u64)> {
    let mut response = request.send().await?;
    if !response.status().is_success() {
        let status = response.status();
        bail!("{}", explain(status, &response.text().await.unwrap_or_default()));
    }
    let mut file = tokio::fs::File::create(path).await.with_context(|| format!("cannot create {}", path.display()))?;
    let (mut bytes, mut lines) = (0u64, 0u64);
    while let Some(chunk) = response.chunk().await? {
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    Ok((bytes, lines))
}

fn progress_spinner(show: bool) -> Option<indicatif::ProgressBar> {
    show.then(|| {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.enable_steady_tick(Duration::from_millis(120));
        spinner.set_message("export running");
        spinner
    })
}

fn progress_bar(show: bool, files: u64) -> Option<indicatif::ProgressBar> {
    show.then(|| {
        let bar = indicatif::ProgressBar::new(files);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} files {elapsed}") {
            bar.set_style(style);
        }
        bar
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(level: ExportTarget) -> ExportOptions {
        ExportOptions {
            base_url: "https://fhir.example.org/r4/".into(),
            level,
            types: Vec::new(),
            since: None,
            type_filters: Vec::new(),
            elements: Vec::new(),
            token: None,
            out: PathBuf::from("out"),
            poll_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(60),
            progress: false,
        }
    }

    #[test]
    fn kick_off_urls_carry_the_parameters_encoded() {
        assert_eq!(kick_off_url(&options(ExportTarget::System)), "https://fhir.example.org/r4/$export");
        let mut group = options(ExportTarget::Group("g1".into()));
        group.types = vec!["Patient".into(), "Observation".into()];
        group.since = Some("2026-01-01T00:00:00+01:00".into());
        group.type_filters = vec!["Observation?status=final".into()];
        assert_eq!(
            kick_off_url(&group),
            "https://fhir.example.org/r4/Group/g1/$export?_type=Patient,Observation&_since=2026-01-01T00:00:00%2B01:00\
             &_typeFilter=Observation%3Fstatus%3Dfinal"
        );
        assert_eq!(kick_off_url(&options(ExportTarget::Patient)), "https://fhir.example.org/r4/Patient/$export");
    }

    #[test]
    fn targets_and_file_names_are_checked() {
        assert_eq!(ExportTarget::parse("group:abc"), Ok(ExportTarget::Group("abc".into())));
        assert!(ExportTarget::parse("group:").is_err());
        assert!(ExportTarget::parse("group:a/b").is_err());
        assert!(ExportTarget::parse("everything").is_err());
        assert_eq!(file_name("http://h/$export-file/j/Patient-1.ndjson", 0), "Patient-1.ndjson");
        assert_eq!(file_name("https://s3/bucket/x.ndjson?X-Amz-Signature=1", 0), "x.ndjson");
        assert_eq!(file_name("http://h/files/../..", 2), "output-3.ndjson");
        assert_eq!(file_name("http://h/files/", 0), "output-1.ndjson");
    }

    #[test]
    fn error_answers_are_explained_by_their_outcome() {
        let outcome = r#"{"resourceType":"OperationOutcome","issue":[{"diagnostics":"_type names an unknown resource type 'X'"}]}"#;
        assert_eq!(
            explain(reqwest::StatusCode::BAD_REQUEST, outcome),
            "400 Bad Request: _type names an unknown resource type 'X'"
        );
        assert_eq!(explain(reqwest::StatusCode::BAD_GATEWAY, "upstream down"), "502 Bad Gateway: upstream down");
    }
}
