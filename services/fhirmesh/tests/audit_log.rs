//! The audit record and the ordinary logs, read from the real binary's stderr: every request leaves
//! one `fhirmesh::audit` record (method, path, status, request id, source), and no resource body,
//! name, identifier or query value ever reaches the logs — even at debug level.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

const NAME: &str = "Zyxwvutsrq";
const IDENTIFIER: &str = "SECRET-MRN-987654";

#[tokio::test]
async fn every_request_is_audited_and_no_phi_is_logged() {
    let data = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fhirmesh"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("fhirmesh starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let base = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("stdout") {
            if let Some((_, address)) = line.split_once(" listening on ") {
                return address.trim().to_owned();
            }
        }
        panic!("fhirmesh exited before listening");
    })
    .await
    .expect("listening within 30 s");
    let mut stderr = child.stderr.take().expect("stderr");
    let logs = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });

    let client = reqwest::Client::new();
    let patient = serde_json::json!({"resourceType": "Patient", "name": [{"family": NAME}],
        "identifier": [{"system": "urn:mrn", "value": IDENTIFIER}]});
    let created = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .header("x-request-id", "audit-test-1")
        .body(patient.to_string())
        .send()
        .await
        .expect("create sent");
    assert_eq!(created.status().as_u16(), 201);
    let location = created.headers()["location"].to_str().expect("ascii").to_owned();
    let searched = client
        .get(format!("{base}/Patient?family={NAME}&identifier=urn:mrn%7C{IDENTIFIER}"))
        .send()
        .await
        .expect("search sent");
    assert_eq!(searched.status().as_u16(), 200);
    assert!(searched.text().await.expect("body").contains(NAME), "the search finds the Patient");
    let invalid = client
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .body(format!("{{\"resourceType\": \"Patient\", \"name\": [{{\"family\": \"{NAME}\"}}], \"bogus\": 1}}"))
        .send()
        .await
        .expect("invalid create sent");
    assert_eq!(invalid.status().as_u16(), 400);
    let read = client.get(&location).send().await.expect("read sent");
    assert_eq!(read.status().as_u16(), 200);

    let pid = child.id().expect("running");
    let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("kill -TERM");
    assert!(status.success());
    tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits").expect("reaped");
    let logs = logs.await.expect("stderr read");

    let audit: Vec<&str> = logs.lines().filter(|line| line.contains("fhirmesh::audit")).collect();
    assert_eq!(audit.len(), 4, "one record per request:\n{}", audit.join("\n"));
    let create = audit.iter().find(|line| line.contains("request_id=audit-test-1")).expect("the create's record");
    for field in ["method=POST", "path=/Patient", "status=201", "source=\"127.0.0.1\"", "duration_ms="] {
        assert!(create.contains(field), "{field} in {create}");
    }
    assert!(audit.iter().any(|line| line.contains("method=GET") && line.contains("status=200")));
    assert!(audit.iter().any(|line| line.contains("status=400")));
    assert!(logs.lines().any(|line| !line.contains("fhirmesh::audit")), "ordinary logs exist at debug level");
    for secret in [NAME, IDENTIFIER] {
        let leaks: Vec<&str> = logs.lines().filter(|line| line.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret} leaked into the logs:\n{}", leaks.join("\n"));
    }
}
