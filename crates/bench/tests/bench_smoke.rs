//! A seconds-long smoke run of every `fhirmesh bench` scenario against the embedded server: each
//! one issues requests and none fails. It measures nothing (figures come from `make bench`).

use std::time::Duration;

use fhirmesh_bench::bench::{BenchConfig, Scenario, run};
use fhirmesh_bench::client::BaseUrl;
use fhirmesh_testkit::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_without_errors() {
    // The `rest-hook` scenario's receiver listens on 127.0.0.1 over http.
    let server = TestServer::start_with(|config| {
        config.notifier.allow_endpoints = vec!["127.0.0.1".into()];
        config.notifier.allow_insecure_http = true;
    })
    .await;
    let config = BenchConfig {
        base: BaseUrl::parse(&server.base).expect("base url"),
        scenarios: Scenario::ALL.to_vec(),
        connections: 2,
        duration: Duration::from_millis(300),
        max_requests: Some(200),
        patients: 20,
        baseline: true,
        seed: 7,
    };
    let report = run(config).await.expect("bench run");
    let baseline = report.baseline.as_ref().expect("baseline");
    assert!(baseline.requests > 0 && baseline.errors == 0, "{baseline:?}");
    assert_eq!(report.scenarios.len(), Scenario::ALL.len());
    for row in &report.scenarios {
        assert!(row.requests > 0, "{} issued no request", row.scenario);
        assert_eq!(row.errors, 0, "{}: {:?}", row.scenario, row.first_error);
        assert!(row.requests <= 200, "{} stayed within its budget", row.scenario);
        assert!(row.ratio_to_baseline.is_some());
        assert!(row.p50_ms <= row.p99_ms && row.p99_ms <= row.max_ms, "{row:?}");
    }
    let table = report.table();
    for scenario in Scenario::ALL {
        assert!(table.contains(scenario.name()), "{table}");
    }
    assert_eq!(report.to_json()["scenarios"].as_array().map(Vec::len), Some(Scenario::ALL.len()));
    eprintln!("{table}");
    server.stop().await;
}
