//! Faults of issue 11 on the mesh as separate processes, each under a steady write load and
//! bounded in time:
//! - the resource service killed with SIGKILL and restarted on its address, then nats-server
//!   stopped and restarted on its port and store: clients retry what failed (PUT with their own
//!   ids, so a retry cannot duplicate), every write ends acknowledged, the search index ends
//!   equal to the store, and a rest-hook Subscription matching every write is notified of each
//!   at least once (the notifier reads the bus and calls the resource service through both);
//! - a rolling restart of two gateways behind a readiness-following "load balancer": no request
//!   fails at all (each gateway leaves the pool when `/readyz` turns 503, before it stops
//!   accepting).

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fhirmesh_testinfra::unique_name as unique;
use serde_json::{Value, json};
use support::{Process, Shape, mesh_env};
use tokio::process::{Child, Command};

/// How long a client keeps retrying one write before the test gives up on the mesh.
const WRITE_PATIENCE: Duration = Duration::from_secs(60);

/// A port of 127.0.0.1 free now (a restarted process binds the same one).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

/// A nats-server with JetStream of this test's own (the shared one must not be restarted).
async fn nats_server(port: u16, store: &std::path::Path) -> Child {
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server starts");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nats-server did not listen on {port}");
}

async fn stop_nats(mut child: Child) {
    let pid = child.id().expect("running");
    let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("kill -TERM");
    assert!(status.success());
    tokio::time::timeout(Duration::from_secs(15), child.wait()).await.expect("nats-server stops").expect("reaped");
}

/// PUT `Patient/{id}` until acknowledged: a refused connection or a 5xx (a dependency down) is
/// tried again; any other answer fails the test. Returns how many tries failed.
async fn put_until_acknowledged(client: &reqwest::Client, base: &str, id: &str, family: &str) -> usize {
    let mut failed = 0;
    let deadline = tokio::time::Instant::now() + WRITE_PATIENCE;
    let body = json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]}).to_string();
    loop {
        let sent = client
            .put(format!("{base}/Patient/{id}"))
            .header("content-type", "application/fhir+json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => return failed,
            Ok(response) if response.status().is_server_error() => {}
            Ok(response) => {
                let status = response.status();
                panic!("Patient/{id}: {status} {}", response.text().await.unwrap_or_default())
            }
            Err(_) => {}
        }
        failed += 1;
        assert!(tokio::time::Instant::now() < deadline, "Patient/{id} not acknowledged within {WRITE_PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every id matching `query` through the gateway, following `next` links.
async fn ids(client: &reqwest::Client, base: &str, query: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut url = format!("{base}/{query}");
    loop {
        let page: Value = client.get(&url).send().await.expect("page").json().await.expect("json");
        for entry in page["entry"].as_array().into_iter().flatten() {
            if let Some(id) = entry["resource"]["id"].as_str() {
                found.insert(id.to_owned());
            }
        }
        let next = page["link"].as_array().into_iter().flatten().find(|l| l["relation"] == "next");
        match next.and_then(|l| l["url"].as_str()) {
            Some(next) => url = next.to_owned(),
            None => return found,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_resource_service_and_restarting_nats_loses_no_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats_store = tempfile::tempdir().expect("nats store");
    let nats_port = free_port();
    let nats = nats_server(nats_port, nats_store.path()).await;
    let mut env = mesh_env(&Shape::NatsFromChangeLog);
    env.push(("FHIRMESH_NATS__URL".to_owned(), format!("nats://127.0.0.1:{nats_port}")));
    // The receiver below is local and plain HTTP (Subscriptions are checked where they are written).
    env.push(("FHIRMESH_NOTIFIER__ALLOW_ENDPOINTS".to_owned(), "[\"127.0.0.1\"]".to_owned()));
    env.push(("FHIRMESH_NOTIFIER__ALLOW_INSECURE_HTTP".to_owned(), "true".to_owned()));
    let grpc = format!("127.0.0.1:{}", free_port());
    let resource_args = ["--target", "resource", "--grpc-listen", grpc.as_str()];
    let resource = support::spawn_with_env(&resource_args, Some(dir.path()), &env).await;
    let relay = support::spawn_with_env(&["--target", "relay"], Some(dir.path()), &env).await;
    let indexer = support::spawn_with_env(&["--target", "indexer"], Some(dir.path()), &env).await;
    let endpoint = format!("http://{grpc}");
    let gateway_args = ["--target", "gateway", "--listen", "127.0.0.1:0", "--resource-endpoint", endpoint.as_str()];
    let gateway = support::spawn_with_env(&gateway_args, None, &env).await;
    let base = gateway.address.clone();
    let client = reqwest::Client::new();
    let family = unique("Fault");

    // A rest-hook Subscription on every Patient the load writes, delivered by a notifier of its own.
    let mut notifier_env = env.clone();
    notifier_env.push(("FHIRMESH_NOTIFIER__RESOURCE_ENDPOINT".to_owned(), endpoint.clone()));
    let notifier = support::spawn_with_env(&["--target", "notifier"], Some(dir.path()), &notifier_env).await;
    let (hook, received) = support::hook_receiver(Duration::ZERO).await;
    let subscription = json!({"resourceType": "Subscription", "status": "requested", "reason": "faults",
        "criteria": format!("Patient?family={family}"), "channel": {"type": "rest-hook", "endpoint": hook}});
    let response = client
        .post(format!("{base}/Subscription"))
        .header("content-type", "application/fhir+json")
        .body(subscription.to_string())
        .send()
        .await
        .expect("create the Subscription");
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.expect("json");
    let subscription = format!("{base}/Subscription/{}", created["id"].as_str().expect("id"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let current: Value = client.get(&subscription).send().await.expect("read").json().await.expect("json");
        if current["status"] == "active" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the notifier did not activate the Subscription");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The load: 4 writers, each PUTting its own Patients one after the other until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let (client, base, family, stop) = (client.clone(), base.clone(), family.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut written, mut failed) = (Vec::new(), 0);
                while !stop.load(Ordering::Acquire) && written.len() < 2_000 {
                    let id = format!("w{writer}-{}", written.len());
                    failed += put_until_acknowledged(&client, &base, &id, &family).await;
                    written.push(id);
                }
                (written, failed)
            })
        })
        .collect();
    let pause = || tokio::time::sleep(Duration::from_millis(1_500));

    pause().await;
    resource.kill_9().await;
    pause().await; // writes fail meanwhile (503) and are tried again
    let resource = support::spawn_with_env(&resource_args, Some(dir.path()), &env).await;
    pause().await;
    stop_nats(nats).await;
    pause().await; // the store takes writes; the relay cannot publish them yet
    let nats = nats_server(nats_port, nats_store.path()).await;
    pause().await;
    stop.store(true, Ordering::Release);
    let (mut written, mut failed) = (BTreeSet::new(), 0);
    for writer in writers {
        let (ids, failures) = writer.await.expect("writer");
        written.extend(ids);
        failed += failures;
    }
    assert!(written.len() > 20, "the load wrote through the faults: {}", written.len());
    assert!(failed > 0, "writes failed while the resource service was down, and were tried again");

    // The store holds every write (history reads the store), and the index catches up to it.
    let in_store = ids(&client, &base, "Patient/_history?_count=500").await;
    assert_eq!(in_store, written, "the store holds exactly the acknowledged writes");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let query = format!("Patient?family={family}&_count=500");
    let mut in_index = ids(&client, &base, &query).await;
    while in_index != written && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        in_index = ids(&client, &base, &query).await;
    }
    assert_eq!(in_index, written, "the search index equals the store after the faults");

    // Every write notified at least once: each Patient's first version (a write applied whose
    // answer was lost at a kill is tried again, and makes a version 2, notified too).
    let expected: BTreeSet<String> = written.iter().map(|id| format!("default/Patient/{id}/_history/1")).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let notified = || -> BTreeSet<String> { received.lock().expect("received").keys().cloned().collect() };
    while !expected.is_subset(&notified()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let missing: Vec<_> = expected.difference(&notified()).cloned().collect();
    assert!(missing.is_empty(), "{} of {} writes never notified: {missing:?}", missing.len(), expected.len());
    let strays: Vec<_> = notified()
        .into_iter()
        .filter(|event| !written.iter().any(|id| event.starts_with(&format!("default/Patient/{id}/_history/"))))
        .collect();
    assert!(strays.is_empty(), "notified for what the load did not write: {strays:?}");

    for process in [gateway, notifier, indexer, relay, resource] {
        process.kill_9().await;
    }
    stop_nats(nats).await;
}

/// A load balancer's view: the gateways whose `/readyz` answered 200 at the last poll.
struct Pool {
    gateways: Vec<String>,
    ready: Vec<AtomicBool>,
}

impl Pool {
    fn pick(&self, n: usize) -> Option<&str> {
        (0..self.gateways.len())
            .map(|k| (n + k) % self.gateways.len())
            .find(|&i| self.ready[i].load(Ordering::Acquire))
            .map(|i| self.gateways[i].as_str())
    }
}

async fn gateway_on(port: u16, endpoint: &str) -> Process {
    let listen = format!("127.0.0.1:{port}");
    let env = [("FHIRMESH_OPS__DRAIN_DELAY_SECONDS".to_owned(), "1".to_owned())];
    let args = ["--target", "gateway", "--listen", listen.as_str(), "--resource-endpoint", endpoint];
    support::spawn_with_env(&args, None, &env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_two_gateways_fails_no_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let resource = support::spawn(&["--target", "resource", "--grpc-listen", "127.0.0.1:0"], Some(dir.path())).await;
    let indexer = support::spawn(&["--target", "indexer"], Some(dir.path())).await;
    let endpoint = format!("http://{}", resource.address);
    let ports = [free_port(), free_port()];
    let mut gateways = vec![gateway_on(ports[0], &endpoint).await, gateway_on(ports[1], &endpoint).await];
    let pool = Arc::new(Pool {
        gateways: gateways.iter().map(|g| g.address.clone()).collect(),
        ready: vec![AtomicBool::new(true), AtomicBool::new(true)],
    });
    let client = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));

    // The load balancer polls readiness every 100 ms.
    let balancer = tokio::spawn({
        let (pool, client, stop) = (pool.clone(), client.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Acquire) {
                for (i, gateway) in pool.gateways.iter().enumerate() {
                    let ready = client
                        .get(format!("{gateway}/readyz"))
                        .timeout(Duration::from_millis(500))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                    pool.ready[i].store(ready, Ordering::Release);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    // Clients: creates and reads through whichever gateway the pool offers.
    let clients: Vec<_> = (0..3)
        .map(|worker| {
            let (pool, client, stop) = (pool.clone(), client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut answered = 0;
                let mut n = worker;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let Some(base) = pool.pick(n) else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let response = client
                        .post(format!("{base}/Patient"))
                        .header("content-type", "application/fhir+json")
                        .body(json!({"resourceType": "Patient", "name": [{"family": "Rolling"}]}).to_string())
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("a request to {base} failed during the rolling restart: {e}"));
                    assert_eq!(response.status(), 201, "through {base}");
                    answered += 1;
                }
                answered
            })
        })
        .collect();

    // Roll: each gateway in turn gets SIGTERM, exits gracefully, and comes back on its port.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for (i, port) in ports.into_iter().enumerate() {
        let old = gateways.remove(0);
        assert!(old.terminate().await.success(), "gateway {i} stops gracefully");
        tokio::time::sleep(Duration::from_millis(300)).await;
        gateways.push(gateway_on(port, &endpoint).await);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    stop.store(true, Ordering::Release);
    let mut answered = 0;
    for worker in clients {
        answered += worker.await.expect("no request failed");
    }
    balancer.await.expect("balancer");
    assert!(answered > 30, "requests went through during the roll: {answered}");

    for process in gateways.into_iter().chain([indexer, resource]) {
        assert!(process.terminate().await.success());
    }
}
