//! Running the real `fhirmesh` binary as a child process.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fhirmesh_testinfra::{aws_endpoint, nats_url, unique_name as unique};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The `X-Fhirmesh-Event-Id`s a rest-hook receiver got, with how often each came.
pub type Received = Arc<Mutex<BTreeMap<String, usize>>>;

/// A rest-hook receiver on 127.0.0.1 answering 200 to anything after `delay` (a slow receiver
/// keeps notifications in flight), and its base URL.
pub async fn hook_receiver(delay: Duration) -> (String, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the receiver");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let record = {
        let received = received.clone();
        move |headers: axum::http::HeaderMap| {
            let event = headers.get("x-fhirmesh-event-id").and_then(|v| v.to_str().ok()).unwrap_or("no event id");
            *received.lock().expect("received").entry(event.to_owned()).or_default() += 1;
            async move {
                tokio::time::sleep(delay).await;
                axum::http::StatusCode::OK
            }
        }
    };
    tokio::spawn(async move { axum::serve(listener, axum::Router::new().fallback(record)).await });
    (base, received)
}

/// A `fhirmesh` child process and the address it announced.
pub struct Process {
    pub child: Child,
    pub address: String,
    /// Where it serves `/healthz`, `/readyz` and `/metrics` (`http://…`): `ops.listen` for every
    /// target but the gateway, whose FHIR address serves them.
    pub ops: String,
}

/// Runs `fhirmesh provision` with `env` (tables, bus, bucket); its stdout.
pub fn provision(env: &[(String, String)]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fhirmesh"))
        .arg("provision")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "warn")
        .output()
        .expect("fhirmesh provision runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "provision failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// A gateway on `resource` (`extra`: more environment, e.g. the exporter's endpoint).
pub async fn gateway(env: &[(String, String)], resource: &Process, extra: &[(&str, String)]) -> Process {
    let mut env = env.to_vec();
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let resource_endpoint = format!("http://{}", resource.address);
    let args = ["--target", "gateway", "--listen", "127.0.0.1:0", "--resource-endpoint", &resource_endpoint];
    spawn_with_env(&args, None, &env).await
}

/// The smallest mesh on the embedded store in `dir`: a resource service, an indexer and a gateway,
/// each its own process.
pub async fn split_on_sqlite(dir: &Path) -> (Process, Process, Process) {
    let resource = spawn(&["--target", "resource", "--grpc-listen", "127.0.0.1:0"], Some(dir)).await;
    let indexer = spawn(&["--target", "indexer"], Some(dir)).await;
    let endpoint = format!("http://{}", resource.address);
    let gateway =
        spawn(&["--target", "gateway", "--listen", "127.0.0.1:0", "--resource-endpoint", &endpoint], None).await;
    (resource, indexer, gateway)
}

/// Starts `fhirmesh serve <args>` and waits for its "listening on" (or "indexer running on") line.
pub async fn spawn(args: &[&str], data_dir: Option<&Path>) -> Process {
    spawn_with_env(args, data_dir, &[]).await
}

/// [`spawn`] with extra environment variables (`FHIRMESH_SECTION__KEY` configuration).
pub async fn spawn_with_env(args: &[&str], data_dir: Option<&Path>, env: &[(String, String)]) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fhirmesh"));
    // Many processes on one machine: each its own health and metrics port (unless `env` says).
    command.env("FHIRMESH_OPS__LISTEN", "127.0.0.1:0");
    command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    command
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "warn")
        // The mesh tests run an open gateway; a real mesh refuses to start without auth.
        .env("FHIRMESH_AUTH__INSECURE_ALLOW_NONE", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(dir) = data_dir {
        command.arg("--data-dir").arg(dir);
    }
    let mut child = command.spawn().expect("fhirmesh starts");
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = BufReader::new(stdout).lines();
    // The health and metrics line comes first (every target but the gateway prints one).
    let mut ops = None;
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("stdout readable") {
            if let Some((_, address)) = line.split_once(" /metrics) on ") {
                ops = Some(address.trim().to_owned());
                continue;
            }
            if let Some((_, address)) = line.split_once(" listening on ") {
                return address.trim().to_owned();
            }
            if let Some((_, bus)) = line.split_once(" notifier consuming the ") {
                return bus.trim().to_owned();
            }
            if let Some((_, data_dir)) = line.split_once(" indexer running on ") {
                return data_dir.trim().to_owned();
            }
            if let Some((_, bus)) = line.split_once(" relay publishing changes to the ") {
                return bus.trim().to_owned();
            }
        }
        panic!("fhirmesh exited before listening");
    })
    .await
    .expect("fhirmesh announces its address within 30 s");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let ops = ops.unwrap_or_else(|| address.clone());
    Process { child, address, ops }
}

impl Process {
    /// SIGKILL, no chance to flush anything.
    pub async fn kill_9(mut self) {
        self.child.start_kill().expect("kill -9");
        self.child.wait().await.expect("reaped");
    }

    /// SIGTERM and wait for a graceful exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("kill -TERM");
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits within 30 s")
            .expect("reaped")
    }
}

/// The bus a mesh test runs on, and where its relay reads.
pub enum Shape {
    NatsFromChangeLog,
    NatsFromStreams,
    SnsSqsFromChangeLog,
}

pub fn mesh_env(shape: &Shape) -> Vec<(String, String)> {
    let mut pairs = vec![
        ("FHIRMESH_STORAGE__BACKEND", "dynamodb".to_owned()),
        ("FHIRMESH_AWS__ENDPOINT_URL", aws_endpoint()),
        ("FHIRMESH_AWS__REGION", "us-east-1".to_owned()),
        ("FHIRMESH_DYNAMODB__TABLE", unique("mesh")),
        ("FHIRMESH_DYNAMODB__CREATE_TABLE", "true".to_owned()),
        ("FHIRMESH_BUS__PROVISION", "true".to_owned()),
    ];
    match shape {
        Shape::NatsFromChangeLog | Shape::NatsFromStreams => pairs.extend([
            ("FHIRMESH_BUS__BACKEND", "nats".to_owned()),
            ("FHIRMESH_NATS__URL", nats_url()),
            ("FHIRMESH_NATS__STREAM", unique("MESH")),
            ("FHIRMESH_NATS__SUBJECT_PREFIX", unique("mesh")),
            ("FHIRMESH_NATS__DEAD_LETTER_STREAM", unique("MESHDLQ")),
            ("FHIRMESH_NATS__DEAD_LETTER_SUBJECT_PREFIX", unique("meshdlq")),
        ]),
        Shape::SnsSqsFromChangeLog => pairs.extend([
            ("FHIRMESH_BUS__BACKEND", "sns_sqs".to_owned()),
            ("FHIRMESH_SNS_SQS__TOPIC_NAME", unique("mesh")),
            ("FHIRMESH_SNS_SQS__QUEUE_PREFIX", unique("mesh")),
        ]),
    }
    if let Shape::NatsFromStreams = shape {
        // A restarted relay with the same worker id takes its shard leases back at once.
        pairs
            .extend([("FHIRMESH_RELAY__SOURCE", "streams".to_owned()), ("FHIRMESH_RELAY__WORKER_ID", unique("relay"))]);
    }
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}
