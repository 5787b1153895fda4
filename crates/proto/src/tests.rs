//! End-to-end tests of the adapters: a HashMap-backed `ResourceService` served on a real TCP
//! listener (127.0.0.1:0) and driven through `GrpcResourceClient`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use fhirmesh_core::ports::HistoryScope;
use fhirmesh_core::service::{
    BundleKind, BundleRequest, BundleResult, ConditionalDeleteRequest, ConditionalDeleteResult,
    ConditionalUpdateRequest, CreateRequest, DeleteRequest, DeleteResult, EntryResult, HistoryPage, HistoryRequest,
    IndexStatus, PatchDocument, PatchRequest, SearchPage, SearchRequest, UpdateRequest, WriteResult,
};
use fhirmesh_core::{
    ErrorCategory, FhirError, FhirResult, Operation, RequestContext, ResourceChanged, ResourceService, ResourceVersion,
    TenantId,
};
use fhirmesh_fhir::outcome::{Issue, IssueType, Severity};
use fhirmesh_fhir::search::query::SearchScope;
use fhirmesh_fhir::{LogicalId, ResourceType};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic::{Request, Response, Status};

use crate::pb::resource_service_client::ResourceServiceClient;
use crate::pb::resource_service_server::{ResourceService as ResourceServiceRpc, ResourceServiceServer};
use crate::{
    GrpcResourceClient, WireError, decode_resource_changed, encode_resource_changed, pb, resource_service_server,
    resource_service_server_with_limit,
};

// ---------------------------------------------------------------------------------------------
// A tiny in-memory ResourceService.

type Key = (TenantId, ResourceType, LogicalId);

#[derive(Default)]
struct Memory {
    versions: HashMap<Key, Vec<ResourceVersion>>,
    sequence: u64,
    next_id: u64,
    /// The last request context seen, to check it crossed the wire.
    last_context: Option<RequestContext>,
}

#[derive(Default)]
struct FakeService(Mutex<Memory>);

fn instant(sequence: u64) -> OffsetDateTime {
    // Distinct instants with sub-second precision, to check nanoseconds survive.
    let nanos = 1_700_000_000_000_000_000_i128 + i128::from(sequence) * 1_000_000_123;
    OffsetDateTime::from_unix_timestamp_nanos(nanos).expect("valid instant")
}

fn stamp(body: &Bytes, id: &LogicalId) -> Bytes {
    let mut json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    json["id"] = id.as_str().into();
    json.to_string().into()
}

impl Memory {
    fn lock<'a>(service: &'a FakeService, ctx: &RequestContext) -> std::sync::MutexGuard<'a, Memory> {
        let mut memory = service.0.lock().expect("fake lock");
        memory.last_context = Some(ctx.clone());
        memory
    }

    fn append(&mut self, key: &Key, operation: Operation, body: Option<Bytes>) -> ResourceVersion {
        self.sequence += 1;
        let sequence = self.sequence;
        let versions = self.versions.entry(key.clone()).or_default();
        let version = ResourceVersion {
            resource_type: key.1,
            id: key.2.clone(),
            version_id: versions.len() as u64 + 1,
            last_updated: instant(sequence),
            operation,
            body,
            sequence,
        };
        versions.push(version.clone());
        version
    }

    fn current(&self, key: &Key) -> Option<&ResourceVersion> {
        self.versions.get(key).and_then(|v| v.last())
    }

    fn check_if_match(&self, key: &Key, if_match: Option<u64>) -> FhirResult<()> {
        let current = self.current(key).map(|v| v.version_id);
        match if_match {
            Some(expected) if current != Some(expected) => Err(FhirError::new(
                ErrorCategory::PreconditionFailed,
                format!("If-Match {expected} does not match current version {current:?}"),
            )),
            _ => Ok(()),
        }
    }
}

fn check_body(resource_type: ResourceType, body: &Bytes) -> FhirResult<()> {
    let json: serde_json::Value = serde_json::from_slice(body).map_err(|_| FhirError::invalid("body is not JSON"))?;
    if json["resourceType"] != resource_type.as_str() {
        return Err(
            FhirError::invalid("resourceType does not match the URL").at(format!("{resource_type}.resourceType"))
        );
    }
    Ok(())
}

fn criteria_id(criteria: &[(String, String)]) -> FhirResult<LogicalId> {
    criteria
        .iter()
        .find(|(name, _)| name == "_id")
        .and_then(|(_, value)| LogicalId::parse(value).ok())
        .ok_or_else(|| FhirError::invalid("the fake resolves _id criteria only").at("_id"))
}

#[async_trait]
impl ResourceService for FakeService {
    async fn create(&self, ctx: &RequestContext, request: CreateRequest) -> FhirResult<WriteResult> {
        check_body(request.resource_type, &request.body)?;
        let mut memory = Memory::lock(self, ctx);
        if let Some(existing) = request.if_none_exist.as_deref().and_then(|q| q.strip_prefix("_id=")) {
            let key = (
                ctx.tenant.clone(),
                request.resource_type,
                LogicalId::parse(existing).map_err(|e| FhirError::invalid(e.to_string()))?,
            );
            if let Some(current) = memory.current(&key).filter(|v| !v.is_deleted()) {
                return Ok(WriteResult { version: current.clone(), created: false, written: false });
            }
        }
        memory.next_id += 1;
        let id = LogicalId::parse(&format!("p{}", memory.next_id)).expect("valid id");
        let body = stamp(&request.body, &id);
        let version = memory.append(&(ctx.tenant.clone(), request.resource_type, id), Operation::Create, Some(body));
        Ok(WriteResult { version, created: true, written: true })
    }

    async fn read(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: LogicalId,
    ) -> FhirResult<ResourceVersion> {
        let memory = Memory::lock(self, ctx);
        match memory.current(&(ctx.tenant.clone(), resource_type, id.clone())) {
            None => Err(FhirError::not_found(format!("{resource_type}/{id} not found"))),
            Some(v) if v.is_deleted() => {
                Err(FhirError::new(ErrorCategory::Gone, format!("{resource_type}/{id} was deleted")))
            }
            Some(v) => Ok(v.clone()),
        }
    }

    async fn vread(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: LogicalId,
        version_id: u64,
    ) -> FhirResult<ResourceVersion> {
        let memory = Memory::lock(self, ctx);
        let found = memory
            .versions
            .get(&(ctx.tenant.clone(), resource_type, id.clone()))
            .and_then(|versions| versions.iter().find(|v| v.version_id == version_id));
        match found {
            None => Err(FhirError::not_found(format!("{resource_type}/{id}/_history/{version_id} not found"))),
            Some(v) if v.is_deleted() => Err(FhirError::new(ErrorCategory::Gone, "version is a delete")),
            Some(v) => Ok(v.clone()),
        }
    }

    async fn update(&self, ctx: &RequestContext, request: UpdateRequest) -> FhirResult<WriteResult> {
        check_body(request.resource_type, &request.body)?;
        let mut memory = Memory::lock(self, ctx);
        let key = (ctx.tenant.clone(), request.resource_type, request.id.clone());
        memory.check_if_match(&key, request.if_match)?;
        let created = memory.current(&key).is_none_or(ResourceVersion::is_deleted);
        let operation = if created { Operation::Create } else { Operation::Update };
        let version = memory.append(&key, operation, Some(stamp(&request.body, &request.id)));
        Ok(WriteResult { version, created, written: true })
    }

    /// Echoes what it was asked as issues: one per request field, so the test sees each cross.
    async fn validate(
        &self,
        _: &RequestContext,
        request: fhirmesh_core::service::ValidateRequest,
    ) -> FhirResult<Vec<Issue>> {
        let mut issues = vec![Issue {
            severity: Severity::Warning,
            code: IssueType::Informational,
            diagnostics: format!("mode '{}'", request.mode.as_str()),
            expression: request.id.map(|id| format!("{}/{id}", request.resource_type)),
        }];
        if let Some(resource) = request.resource {
            issues.push(Issue::error(IssueType::Value, String::from_utf8_lossy(&resource)).at("resource"));
        }
        if let Some(profile) = request.profile {
            issues.push(Issue::error(IssueType::NotSupported, profile));
        }
        Ok(issues)
    }

    async fn patch(&self, ctx: &RequestContext, request: PatchRequest) -> FhirResult<WriteResult> {
        let mut memory = Memory::lock(self, ctx);
        let key = (ctx.tenant.clone(), request.resource_type, request.id.clone());
        memory.check_if_match(&key, request.if_match)?;
        if memory.current(&key).is_none_or(ResourceVersion::is_deleted) {
            return Err(FhirError::not_found("nothing to patch"));
        }
        // The fake records which kind of document it received instead of applying it.
        let (kind, doc) = match &request.patch {
            PatchDocument::JsonPatch(doc) => ("json-patch", doc),
            PatchDocument::FhirPathPatch(doc) => ("fhirpath-patch", doc),
        };
        let body = serde_json::json!({
            "resourceType": request.resource_type.as_str(),
            "id": request.id.as_str(),
            "patchedWith": kind,
            "patch": String::from_utf8_lossy(doc),
        });
        let version = memory.append(&key, Operation::Update, Some(body.to_string().into()));
        Ok(WriteResult { version, created: false, written: true })
    }

    async fn delete(&self, ctx: &RequestContext, request: DeleteRequest) -> FhirResult<DeleteResult> {
        let mut memory = Memory::lock(self, ctx);
        let key = (ctx.tenant.clone(), request.resource_type, request.id);
        memory.check_if_match(&key, request.if_match)?;
        if memory.current(&key).is_none_or(ResourceVersion::is_deleted) {
            return Ok(DeleteResult { version_id: None, sequence: None });
        }
        let version = memory.append(&key, Operation::Delete, None);
        Ok(DeleteResult { version_id: Some(version.version_id), sequence: Some(version.sequence) })
    }

    async fn index_status(&self) -> FhirResult<IndexStatus> {
        Ok(IndexStatus { latest_sequence: 42, watermark: 40 })
    }

    /// Resolves only `_id=…` criteria: enough to prove the request and result cross the wire.
    async fn conditional_update(
        &self,
        ctx: &RequestContext,
        request: ConditionalUpdateRequest,
    ) -> FhirResult<WriteResult> {
        let id = criteria_id(&request.criteria)?;
        let update =
            UpdateRequest { resource_type: request.resource_type, id, body: request.body, if_match: request.if_match };
        self.update(ctx, update).await
    }

    async fn conditional_delete(
        &self,
        ctx: &RequestContext,
        request: ConditionalDeleteRequest,
    ) -> FhirResult<ConditionalDeleteResult> {
        let id = criteria_id(&request.criteria)?;
        let delete = DeleteRequest { resource_type: request.resource_type, id: id.clone(), if_match: None };
        let result = self.delete(ctx, delete).await?;
        let deleted = result.version_id.map(|v| (id, v)).into_iter().collect();
        Ok(ConditionalDeleteResult { deleted, sequence: result.sequence })
    }

    async fn history(&self, ctx: &RequestContext, request: HistoryRequest) -> FhirResult<HistoryPage> {
        let memory = Memory::lock(self, ctx);
        let count: usize = match request.count.as_deref() {
            None => 100,
            Some(raw) => raw.parse().map_err(|_| FhirError::invalid(format!("bad _count '{raw}'")).at("_count"))?,
        };
        let before: u64 = request.page_token.as_deref().and_then(|t| t.parse().ok()).unwrap_or(u64::MAX);
        let mut entries: Vec<ResourceVersion> = memory
            .versions
            .iter()
            .filter(|((tenant, resource_type, id), _)| {
                *tenant == ctx.tenant
                    && match &request.scope {
                        HistoryScope::System => true,
                        HistoryScope::Type(t) => t == resource_type,
                        HistoryScope::Instance(t, i) => t == resource_type && i == id,
                    }
            })
            .flat_map(|(_, versions)| versions.iter().cloned())
            .filter(|v| v.sequence < before)
            .collect();
        entries.sort_by_key(|v| std::cmp::Reverse(v.sequence));
        let next_page_token = (entries.len() > count).then(|| entries[count - 1].sequence.to_string());
        entries.truncate(count);
        Ok(HistoryPage { entries, next_page_token })
    }

    async fn search(&self, ctx: &RequestContext, request: SearchRequest) -> FhirResult<SearchPage> {
        let memory = Memory::lock(self, ctx);
        let mut entries: Vec<ResourceVersion> = memory
            .versions
            .iter()
            .filter(|((tenant, resource_type, _), _)| {
                let wanted = match &request.scope {
                    SearchScope::Type(t) => Some(*t),
                    SearchScope::Compartment { member, .. } => *member,
                    SearchScope::System => None,
                };
                *tenant == ctx.tenant && wanted.is_none_or(|t| t == *resource_type)
            })
            .filter_map(|(_, versions)| versions.last().filter(|v| !v.is_deleted()).cloned())
            .collect();
        entries.sort_by_key(|v| v.sequence);
        // Echo the parameters, in order, so the test sees exactly what arrived.
        let mut echo: Vec<String> = request.params.iter().map(|(n, v)| format!("{n}={v}")).collect();
        if let Some(token) = request.consistency_token {
            echo.push(format!("consistency={token}"));
        }
        if let SearchScope::Compartment { compartment, id, .. } = &request.scope {
            echo.push(format!("compartment={compartment}/{id}"));
        }
        let warnings = if request.strict {
            Vec::new()
        } else {
            vec![fhirmesh_fhir::outcome::Issue {
                severity: fhirmesh_fhir::outcome::Severity::Warning,
                code: fhirmesh_fhir::outcome::IssueType::Informational,
                diagnostics: "lenient search".into(),
                expression: None,
            }]
        };
        Ok(SearchPage {
            total: Some(entries.len() as u64),
            included: entries.iter().take(1).cloned().collect(),
            entries,
            next_page_token: Some(echo.join("&")),
            previous_page_token: request.page_token.clone(),
            applied: request.params.clone(),
            warnings,
        })
    }

    /// Answers [`sample_bundle`] of the kind `Bundle.type` names, so the body is seen to cross the
    /// wire; any other type fails the whole call.
    async fn bundle(&self, ctx: &RequestContext, request: BundleRequest) -> FhirResult<BundleResult> {
        let _memory = Memory::lock(self, ctx);
        let json: serde_json::Value =
            serde_json::from_slice(&request.body).map_err(|_| FhirError::invalid("body is not JSON"))?;
        match json["type"].as_str() {
            Some("transaction") => Ok(sample_bundle(BundleKind::Transaction)),
            Some("batch") => Ok(sample_bundle(BundleKind::Batch)),
            _ => Err(FhirError::invalid("Bundle.type must be 'transaction' or 'batch'").at("Bundle.type")),
        }
    }
}

/// One entry of each shape: a written version with its location, a search page, a failed entry
/// (several issues, an expression) and a 204 with nothing.
fn sample_bundle(kind: BundleKind) -> BundleResult {
    let written = ResourceVersion {
        resource_type: patient(),
        id: id("b1"),
        version_id: 1,
        last_updated: instant(17),
        operation: Operation::Create,
        body: Some(body(serde_json::json!({"resourceType": "Patient", "id": "b1"}))),
        sequence: 17,
    };
    let included = ResourceVersion {
        resource_type: ResourceType::parse("Observation").expect("Observation is a resource type"),
        id: id("o1"),
        version_id: 4,
        last_updated: instant(9),
        operation: Operation::Update,
        body: Some(body(serde_json::json!({"resourceType": "Observation", "id": "o1"}))),
        sequence: 9,
    };
    let search = SearchPage {
        entries: vec![written.clone()],
        included: vec![included],
        total: Some(1),
        next_page_token: Some("after-b1".into()),
        previous_page_token: None,
        applied: vec![("_id".into(), "b1".into()), ("_revinclude".into(), "Observation:subject".into())],
        warnings: vec![Issue {
            severity: Severity::Warning,
            code: IssueType::NotSupported,
            diagnostics: "unknown parameter 'foo' ignored".into(),
            expression: Some("foo".into()),
        }],
    };
    let failed = FhirError::with_issues(
        ErrorCategory::Unprocessable,
        vec![
            Issue::error(IssueType::Required, "name is required").at("Bundle.entry[2].resource.name"),
            Issue {
                severity: Severity::Warning,
                code: IssueType::Value,
                diagnostics: "gender looks odd".into(),
                expression: None,
            },
        ],
    );
    let entry = |status| EntryResult { status, location: None, version: None, search: None, error: None };
    BundleResult {
        kind,
        entries: vec![
            EntryResult { location: Some("Patient/b1/_history/1".into()), version: Some(written), ..entry(201) },
            EntryResult { search: Some(search), ..entry(200) },
            EntryResult { error: Some(failed), ..entry(422) },
            entry(204),
        ],
        last_sequence: Some(17),
    }
}

// ---------------------------------------------------------------------------------------------
// Harness.

struct TestServer {
    endpoint: String,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl TestServer {
    async fn start(router: Router) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr: SocketAddr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = rx.await;
        }));
        TestServer { endpoint: format!("http://{addr}"), shutdown: Some(tx), handle: Some(handle) }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("server task").expect("server shut down cleanly");
        }
    }
}

async fn start_fake() -> (Arc<FakeService>, TestServer, GrpcResourceClient) {
    let fake = Arc::new(FakeService::default());
    let server = TestServer::start(Server::builder().add_service(resource_service_server(fake.clone()))).await;
    let client = GrpcResourceClient::connect(server.endpoint.clone()).expect("valid endpoint");
    (fake, server, client)
}

fn ctx(tenant: &str) -> RequestContext {
    RequestContext {
        tenant: TenantId::parse(tenant).expect("valid tenant"),
        request_id: Some("req-42".to_owned()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()),
        ..RequestContext::default()
    }
}

fn patient() -> ResourceType {
    ResourceType::parse("Patient").expect("Patient is a resource type")
}

fn id(value: &str) -> LogicalId {
    LogicalId::parse(value).expect("valid id")
}

fn body(json: serde_json::Value) -> Bytes {
    json.to_string().into()
}

fn json(bytes: &Option<Bytes>) -> serde_json::Value {
    serde_json::from_slice(bytes.as_ref().expect("a body")).expect("JSON body")
}

// ---------------------------------------------------------------------------------------------
// Round trips.

#[tokio::test]
async fn every_rpc_round_trips() {
    let (fake, server, client) = start_fake().await;
    let ctx = ctx("acme");

    // create
    let created = client
        .create(
            &ctx,
            CreateRequest {
                resource_type: patient(),
                body: body(serde_json::json!({"resourceType": "Patient", "active": true})),
                if_none_exist: None,
            },
        )
        .await
        .expect("create");
    assert!(created.created && created.written);
    let v1 = created.version.clone();
    assert_eq!(
        (v1.resource_type, v1.id.as_str(), v1.version_id, v1.operation),
        (patient(), "p1", 1, Operation::Create)
    );
    assert_eq!(json(&v1.body)["active"], true);
    assert_eq!(fake.0.lock().expect("lock").last_context.as_ref(), Some(&ctx), "context crossed the wire");

    // conditional create that matches: nothing written, the existing version comes back
    let matched = client
        .create(
            &ctx,
            CreateRequest {
                resource_type: patient(),
                body: body(serde_json::json!({"resourceType": "Patient"})),
                if_none_exist: Some("_id=p1".into()),
            },
        )
        .await
        .expect("conditional create");
    assert_eq!(matched, WriteResult { version: v1.clone(), created: false, written: false });

    // read: every field, including the nanosecond timestamp and the sequence
    let read = client.read(&ctx, patient(), id("p1")).await.expect("read");
    assert_eq!(read, v1);
    assert_eq!(read.last_updated, instant(1));

    // update with If-Match
    let updated = client
        .update(
            &ctx,
            UpdateRequest {
                resource_type: patient(),
                id: id("p1"),
                body: body(serde_json::json!({"resourceType": "Patient", "active": false})),
                if_match: Some(1),
            },
        )
        .await
        .expect("update");
    assert_eq!((updated.version.version_id, updated.version.operation, updated.created), (2, Operation::Update, false));

    // update-as-create
    let upserted = client
        .update(
            &ctx,
            UpdateRequest {
                resource_type: patient(),
                id: id("other"),
                body: body(serde_json::json!({"resourceType": "Patient"})),
                if_match: None,
            },
        )
        .await
        .expect("update as create");
    assert!(upserted.created);

    // patch: both document kinds arrive as themselves
    let patched = client
        .patch(
            &ctx,
            PatchRequest {
                resource_type: patient(),
                id: id("p1"),
                patch: PatchDocument::JsonPatch(Bytes::from_static(b"[]")),
                if_match: Some(2),
            },
        )
        .await
        .expect("json patch");
    assert_eq!(patched.version.version_id, 3);
    assert_eq!(json(&patched.version.body)["patchedWith"], "json-patch");
    let patched = client
        .patch(
            &ctx,
            PatchRequest {
                resource_type: patient(),
                id: id("p1"),
                patch: PatchDocument::FhirPathPatch(body(serde_json::json!({"resourceType": "Parameters"}))),
                if_match: None,
            },
        )
        .await
        .expect("fhirpath patch");
    assert_eq!(json(&patched.version.body)["patchedWith"], "fhirpath-patch");

    // vread of an old version
    let old = client.vread(&ctx, patient(), id("p1"), 2).await.expect("vread");
    assert_eq!(old, updated.version);

    // search: type level, params in order, total
    let page = client
        .search(
            &ctx,
            SearchRequest {
                scope: SearchScope::Type(patient()),
                params: vec![("name:exact".into(), "Ann Lee".into()), ("_count".into(), "5".into())],
                strict: false,
                page_token: Some("cursor-1".into()),
                consistency_token: Some(7),
            },
        )
        .await
        .expect("search");
    assert_eq!(page.total, Some(2));
    assert_eq!(
        page.entries.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        ["other", "p1"] // by sequence of the current version: p1 was patched last
    );
    assert_eq!(page.next_page_token.as_deref(), Some("name:exact=Ann Lee&_count=5&consistency=7"));
    assert_eq!(page.previous_page_token.as_deref(), Some("cursor-1"));
    assert_eq!(page.applied, [("name:exact".to_owned(), "Ann Lee".to_owned()), ("_count".to_owned(), "5".to_owned())]);
    assert_eq!(page.included.len(), 1);
    assert_eq!(page.warnings.len(), 1);
    assert_eq!(page.warnings[0].diagnostics, "lenient search");
    let system = client
        .search(
            &ctx,
            SearchRequest {
                scope: SearchScope::System,
                params: vec![],
                strict: true,
                page_token: None,
                consistency_token: None,
            },
        )
        .await
        .expect("system search");
    assert_eq!(system.total, Some(2));
    assert!(system.warnings.is_empty());
    let compartment = SearchScope::Compartment { compartment: patient(), id: "p1".into(), member: None };
    let in_compartment = client
        .search(
            &ctx,
            SearchRequest {
                scope: compartment,
                params: vec![],
                strict: true,
                page_token: None,
                consistency_token: None,
            },
        )
        .await
        .expect("compartment search");
    assert_eq!(in_compartment.next_page_token.as_deref(), Some("compartment=Patient/p1"));

    // delete, then delete again (nothing live)
    let deleted = client
        .delete(&ctx, DeleteRequest { resource_type: patient(), id: id("p1"), if_match: None })
        .await
        .expect("delete");
    assert_eq!(deleted.version_id, Some(5));
    let tombstone = deleted.sequence.expect("the tombstone's sequence crosses the wire");
    let again = client
        .delete(&ctx, DeleteRequest { resource_type: patient(), id: id("p1"), if_match: None })
        .await
        .expect("delete again");
    assert_eq!(again, DeleteResult { version_id: None, sequence: None });

    // history: instance (tombstone included, no body), type, system, paging
    let history = |scope, count: Option<&str>, page_token: Option<String>| HistoryRequest {
        scope,
        count: count.map(str::to_owned),
        since: None,
        at: None,
        page_token,
    };
    let instance = client
        .history(&ctx, history(HistoryScope::Instance(patient(), id("p1")), None, None))
        .await
        .expect("instance history");
    assert_eq!(instance.entries.iter().map(|v| v.version_id).collect::<Vec<_>>(), [5, 4, 3, 2, 1]);
    assert_eq!(instance.entries[0].operation, Operation::Delete);
    assert_eq!(instance.entries[0].body, None);
    assert_eq!(instance.entries[0].sequence, tombstone);
    let typed =
        client.history(&ctx, history(HistoryScope::Type(patient()), Some("4"), None)).await.expect("type history");
    assert_eq!(typed.entries.len(), 4);
    let token = typed.next_page_token.clone().expect("a next page");
    let rest = client
        .history(&ctx, history(HistoryScope::System, Some("4"), Some(token)))
        .await
        .expect("system history page 2");
    assert_eq!(rest.entries.len(), 2);
    assert_eq!(rest.next_page_token, None);

    // conditional update and delete carry their criteria and results across the wire
    let criteria = vec![("_id".to_owned(), "cond".to_owned())];
    let body = Bytes::from(serde_json::json!({ "resourceType": "Patient", "id": "cond" }).to_string());
    let cond = ConditionalUpdateRequest { resource_type: patient(), criteria: criteria.clone(), body, if_match: None };
    let written = client.conditional_update(&ctx, cond).await.expect("conditional update");
    assert_eq!((written.version.id.as_str(), written.version.version_id), ("cond", 1));
    let cond = ConditionalDeleteRequest { resource_type: patient(), criteria };
    let removed = client.conditional_delete(&ctx, cond).await.expect("conditional delete");
    assert_eq!(removed.deleted, vec![(id("cond"), 2)]);
    assert!(removed.sequence.is_some_and(|sequence| sequence > tombstone), "{removed:?}");
    let bad = ConditionalDeleteRequest { resource_type: patient(), criteria: vec![("name".into(), "x".into())] };
    let err = client.conditional_delete(&ctx, bad).await.expect_err("fake needs _id");
    assert_eq!(err, FhirError::invalid("the fake resolves _id criteria only").at("_id"));

    // index status
    let status = client.index_status().await.expect("index status");
    assert_eq!((status.latest_sequence, status.watermark, status.lag()), (42, 40, 2));

    // tenants stay apart
    let err = client.read(&self::ctx("globex"), patient(), id("other")).await.expect_err("other tenant");
    assert_eq!(err.category, ErrorCategory::NotFound);

    server.stop().await;
}

#[tokio::test]
async fn validate_requests_and_their_issues_round_trip() {
    use fhirmesh_core::service::{ValidateMode, ValidateRequest};
    let (_fake, server, client) = start_fake().await;
    let ctx = ctx("acme");
    let request = ValidateRequest {
        resource_type: patient(),
        id: Some(id("p1")),
        resource: Some(Bytes::from_static(br#"{"resourceType":"Patient"}"#)),
        mode: ValidateMode::Update,
        profile: Some("http://example.org/p".into()),
    };
    let issues = client.validate(&ctx, request).await.expect("validated");
    assert_eq!(
        issues,
        vec![
            Issue {
                severity: Severity::Warning,
                code: IssueType::Informational,
                diagnostics: "mode 'update'".into(),
                expression: Some("Patient/p1".into()),
            },
            Issue::error(IssueType::Value, r#"{"resourceType":"Patient"}"#).at("resource"),
            Issue::error(IssueType::NotSupported, "http://example.org/p"),
        ]
    );
    let delete = ValidateRequest {
        resource_type: patient(),
        id: None,
        resource: None,
        mode: ValidateMode::General,
        profile: None,
    };
    let issues = client.validate(&ctx, delete).await.expect("validated");
    assert_eq!(issues.len(), 1);
    assert_eq!((issues[0].diagnostics.as_str(), issues[0].expression.as_deref()), ("mode ''", None));

    // A mode no core type knows is refused by the server.
    let mut raw = ResourceServiceClient::connect(server.endpoint.clone()).await.expect("connect");
    let context = Some(pb::RequestContext { tenant: "acme".into(), ..Default::default() });
    let status = raw
        .validate(pb::ValidateRequest {
            context,
            resource_type: "Patient".into(),
            mode: "upsert".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown mode");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn bundle_results_round_trip() {
    let (fake, server, client) = start_fake().await;
    let ctx = ctx("acme");

    for (kind, bundle_type) in [(BundleKind::Transaction, "transaction"), (BundleKind::Batch, "batch")] {
        let request = BundleRequest { body: body(serde_json::json!({"resourceType": "Bundle", "type": bundle_type})) };
        let result = client.bundle(&ctx, request).await.expect("bundle");
        assert_eq!(result, sample_bundle(kind));
    }
    assert_eq!(fake.0.lock().expect("lock").last_context.as_ref(), Some(&ctx), "context crossed the wire");

    server.stop().await;
}

#[tokio::test]
async fn errors_keep_their_category_and_outcome() {
    let (_fake, server, client) = start_fake().await;
    let ctx = ctx("acme");

    let err = client.read(&ctx, patient(), id("nobody")).await.expect_err("never existed");
    assert_eq!(err, FhirError::not_found("Patient/nobody not found"));

    client
        .update(
            &ctx,
            UpdateRequest {
                resource_type: patient(),
                id: id("x"),
                body: body(serde_json::json!({"resourceType": "Patient"})),
                if_match: None,
            },
        )
        .await
        .expect("create x");
    client
        .delete(&ctx, DeleteRequest { resource_type: patient(), id: id("x"), if_match: None })
        .await
        .expect("delete x");
    let err = client.read(&ctx, patient(), id("x")).await.expect_err("deleted");
    assert_eq!(err.category, ErrorCategory::Gone);
    assert_eq!(err.issues[0].code, IssueType::Deleted);
    assert_eq!(client.vread(&ctx, patient(), id("x"), 2).await.expect_err("tombstone").category, ErrorCategory::Gone);
    assert_eq!(
        client.vread(&ctx, patient(), id("x"), 9).await.expect_err("no such version").category,
        ErrorCategory::NotFound
    );

    let err = client
        .update(
            &ctx,
            UpdateRequest {
                resource_type: patient(),
                id: id("x"),
                body: body(serde_json::json!({"resourceType": "Patient"})),
                if_match: Some(1),
            },
        )
        .await
        .expect_err("stale If-Match");
    assert_eq!(err.category, ErrorCategory::PreconditionFailed);
    assert_eq!(err.issues[0].diagnostics, "If-Match 1 does not match current version Some(2)");

    let err = client
        .create(
            &ctx,
            CreateRequest {
                resource_type: patient(),
                body: body(serde_json::json!({"resourceType": "Observation"})),
                if_none_exist: None,
            },
        )
        .await
        .expect_err("wrong resourceType");
    assert_eq!(err, FhirError::invalid("resourceType does not match the URL").at("Patient.resourceType"));

    let err = client
        .history(
            &ctx,
            HistoryRequest {
                scope: HistoryScope::System,
                count: Some("many".into()),
                since: None,
                at: None,
                page_token: None,
            },
        )
        .await
        .expect_err("bad _count");
    assert_eq!(err.category, ErrorCategory::Invalid);
    assert_eq!(err.issues[0].expression.as_deref(), Some("_count"));

    // A Bundle that fails as a whole is a status, not a result, and keeps its expression.
    let err = client
        .bundle(&ctx, BundleRequest { body: body(serde_json::json!({"resourceType": "Bundle", "type": "collection"})) })
        .await
        .expect_err("not a transaction or batch");
    assert_eq!(err, FhirError::invalid("Bundle.type must be 'transaction' or 'batch'").at("Bundle.type"));

    server.stop().await;
}

#[tokio::test]
async fn multi_issue_outcomes_cross_intact() {
    struct Failing;
    #[async_trait]
    impl ResourceService for Failing {
        async fn create(&self, _: &RequestContext, _: CreateRequest) -> FhirResult<WriteResult> {
            Err(FhirError::with_issues(
                ErrorCategory::Unprocessable,
                vec![
                    Issue::error(IssueType::Required, "name is required").at("Patient.name"),
                    Issue::error(IssueType::Value, "bad gender").at("Patient.gender"),
                ],
            ))
        }
        async fn read(&self, _: &RequestContext, _: ResourceType, _: LogicalId) -> FhirResult<ResourceVersion> {
            Err(FhirError::new(ErrorCategory::Unavailable, "store unavailable: disk on fire"))
        }
        async fn vread(
            &self,
            _: &RequestContext,
            _: ResourceType,
            _: LogicalId,
            _: u64,
        ) -> FhirResult<ResourceVersion> {
            Err(FhirError::internal("internal store failure"))
        }
        async fn update(&self, _: &RequestContext, _: UpdateRequest) -> FhirResult<WriteResult> {
            Err(FhirError::new(ErrorCategory::Conflict, "version conflict"))
        }
        async fn patch(&self, _: &RequestContext, _: PatchRequest) -> FhirResult<WriteResult> {
            Err(FhirError::new(ErrorCategory::Forbidden, "no"))
        }
        async fn delete(&self, _: &RequestContext, _: DeleteRequest) -> FhirResult<DeleteResult> {
            Err(FhirError::new(ErrorCategory::TooManyRequests, "slow down"))
        }
        async fn conditional_update(&self, _: &RequestContext, _: ConditionalUpdateRequest) -> FhirResult<WriteResult> {
            Err(FhirError::new(ErrorCategory::PreconditionFailed, "criteria match more than one"))
        }
        async fn index_status(&self) -> FhirResult<IndexStatus> {
            Err(FhirError::new(ErrorCategory::Unavailable, "index offline"))
        }
        async fn conditional_delete(
            &self,
            _: &RequestContext,
            _: ConditionalDeleteRequest,
        ) -> FhirResult<ConditionalDeleteResult> {
            Err(FhirError::new(ErrorCategory::PreconditionFailed, "criteria match more than one"))
        }
        async fn history(&self, _: &RequestContext, _: HistoryRequest) -> FhirResult<HistoryPage> {
            Err(FhirError::new(ErrorCategory::Unauthorized, "who are you"))
        }
        async fn search(&self, _: &RequestContext, _: SearchRequest) -> FhirResult<SearchPage> {
            Err(FhirError::unsupported("unknown search parameter 'foo'").at("foo"))
        }
        async fn bundle(&self, _: &RequestContext, _: BundleRequest) -> FhirResult<BundleResult> {
            Err(FhirError::with_issues(
                ErrorCategory::Conflict,
                vec![
                    Issue::error(IssueType::Conflict, "version conflict: rolled back").at("Bundle.entry[1]"),
                    Issue::error(IssueType::Duplicate, "duplicate fullUrl").at("Bundle.entry[3].fullUrl"),
                ],
            ))
        }
    }

    let server = TestServer::start(Server::builder().add_service(resource_service_server(Arc::new(Failing)))).await;
    let client = GrpcResourceClient::connect(server.endpoint.clone()).expect("valid endpoint");
    let ctx = ctx("acme");

    let err = client
        .create(&ctx, CreateRequest { resource_type: patient(), body: Bytes::new(), if_none_exist: None })
        .await
        .expect_err("unprocessable");
    assert_eq!(err.category, ErrorCategory::Unprocessable);
    assert_eq!(err.issues.len(), 2);
    assert_eq!(err.issues[1].expression.as_deref(), Some("Patient.gender"));

    // A server-side Unavailable keeps the server's message (it is not a transport failure).
    let err = client.read(&ctx, patient(), id("a")).await.expect_err("unavailable");
    assert_eq!(err, FhirError::new(ErrorCategory::Unavailable, "store unavailable: disk on fire"));
    let err = client.vread(&ctx, patient(), id("a"), 1).await.expect_err("internal");
    assert_eq!(err, FhirError::internal("internal store failure"));
    let update = UpdateRequest { resource_type: patient(), id: id("a"), body: Bytes::new(), if_match: None };
    assert_eq!(client.update(&ctx, update).await.expect_err("conflict").category, ErrorCategory::Conflict);
    let patch = PatchRequest {
        resource_type: patient(),
        id: id("a"),
        patch: PatchDocument::JsonPatch(Bytes::new()),
        if_match: None,
    };
    assert_eq!(client.patch(&ctx, patch).await.expect_err("forbidden").category, ErrorCategory::Forbidden);
    let delete = DeleteRequest { resource_type: patient(), id: id("a"), if_match: None };
    assert_eq!(client.delete(&ctx, delete).await.expect_err("throttled").category, ErrorCategory::TooManyRequests);
    let history = HistoryRequest { scope: HistoryScope::System, count: None, since: None, at: None, page_token: None };
    assert_eq!(client.history(&ctx, history).await.expect_err("unauthorized").category, ErrorCategory::Unauthorized);
    let search = SearchRequest {
        scope: SearchScope::System,
        params: vec![],
        strict: false,
        page_token: None,
        consistency_token: None,
    };
    assert_eq!(
        client.search(&ctx, search).await.expect_err("unsupported"),
        FhirError::unsupported("unknown search parameter 'foo'").at("foo")
    );
    assert_eq!(client.index_status().await.expect_err("offline").category, ErrorCategory::Unavailable);
    let err = client.bundle(&ctx, BundleRequest { body: Bytes::new() }).await.expect_err("rolled back");
    assert_eq!(err.category, ErrorCategory::Conflict);
    assert_eq!(err.issues.len(), 2);
    assert_eq!(err.issues[1].expression.as_deref(), Some("Bundle.entry[3].fullUrl"));

    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Bad wire data, limits and transport failures.

#[tokio::test]
async fn malformed_requests_are_invalid() {
    let (_fake, server, _client) = start_fake().await;
    let mut raw = ResourceServiceClient::connect(server.endpoint.clone()).await.expect("connect");
    let context = Some(pb::RequestContext { tenant: "acme".into(), ..Default::default() });
    let as_error = |status: Status| crate::status_to_fhir_error(&status, "resource", "test");

    let status = raw
        .read(pb::ReadRequest { context: context.clone(), resource_type: "Nonsense".into(), id: "a".into() })
        .await
        .expect_err("unknown type");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(as_error(status), FhirError::invalid("unknown resource type 'Nonsense'"));

    let status = raw
        .read(pb::ReadRequest { context: context.clone(), resource_type: "Patient".into(), id: "not/an id".into() })
        .await
        .expect_err("bad id");
    let err = as_error(status);
    assert_eq!(err.category, ErrorCategory::Invalid);
    assert!(err.issues[0].diagnostics.starts_with("invalid resource id 'not/an id'"), "{err}");

    let status = raw
        .read(pb::ReadRequest { context: None, resource_type: "Patient".into(), id: "a".into() })
        .await
        .expect_err("no context");
    assert_eq!(as_error(status), FhirError::invalid("missing field `context`"));

    let bad_tenant = Some(pb::RequestContext { tenant: String::new(), ..Default::default() });
    let status =
        raw.search(pb::SearchRequest { context: bad_tenant, ..Default::default() }).await.expect_err("empty tenant");
    assert_eq!(as_error(status).category, ErrorCategory::Invalid);

    let status = raw
        .patch(pb::PatchRequest {
            context: context.clone(),
            resource_type: "Patient".into(),
            id: "a".into(),
            patch: None,
            if_match: None,
        })
        .await
        .expect_err("no patch document");
    assert_eq!(as_error(status), FhirError::invalid("missing field `patch`"));

    let status = raw
        .history(pb::HistoryRequest { context, resource_type: None, id: Some("a".into()), ..Default::default() })
        .await
        .expect_err("id without type");
    assert_eq!(as_error(status), FhirError::invalid("instance history needs a resource type"));

    let status = raw
        .bundle(pb::BundleRequest { context: None, bundle: Bytes::from_static(b"{}") })
        .await
        .expect_err("bundle without context");
    assert_eq!(as_error(status), FhirError::invalid("missing field `context`"));

    server.stop().await;
}

/// Answers every call with data no core type accepts.
#[derive(Clone)]
struct Broken;

fn bad_version() -> pb::ResourceVersion {
    pb::ResourceVersion { resource_type: "Nonsense".into(), id: "a".into(), version_id: 1, ..Default::default() }
}

#[tonic::async_trait]
impl ResourceServiceRpc for Broken {
    async fn create(&self, _: Request<pb::CreateRequest>) -> Result<Response<pb::CreateResponse>, Status> {
        Ok(Response::new(pb::CreateResponse { result: None }))
    }
    async fn read(&self, _: Request<pb::ReadRequest>) -> Result<Response<pb::ReadResponse>, Status> {
        Ok(Response::new(pb::ReadResponse { version: Some(bad_version()) }))
    }
    async fn vread(&self, _: Request<pb::VreadRequest>) -> Result<Response<pb::VreadResponse>, Status> {
        let version =
            pb::ResourceVersion { resource_type: "Patient".into(), id: "a".into(), operation: 0, ..bad_version() };
        Ok(Response::new(pb::VreadResponse { version: Some(version) }))
    }
    async fn update(&self, _: Request<pb::UpdateRequest>) -> Result<Response<pb::UpdateResponse>, Status> {
        Err(Status::internal("panicked at src/secret.rs:12"))
    }
    async fn patch(&self, _: Request<pb::PatchRequest>) -> Result<Response<pb::PatchResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }
    async fn delete(&self, _: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        Err(Status::not_found("plain not found"))
    }
    async fn conditional_update(
        &self,
        _: Request<pb::ConditionalUpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        Ok(Response::new(pb::UpdateResponse { result: None }))
    }
    async fn index_status(
        &self,
        _: Request<pb::IndexStatusRequest>,
    ) -> Result<Response<pb::IndexStatusResponse>, Status> {
        Err(Status::unavailable("index offline"))
    }
    async fn conditional_delete(
        &self,
        _: Request<pb::ConditionalDeleteRequest>,
    ) -> Result<Response<pb::ConditionalDeleteResponse>, Status> {
        let deleted = vec![pb::DeletedResource { id: "not an id!".into(), version_id: 1 }];
        Ok(Response::new(pb::ConditionalDeleteResponse { deleted, sequence: None }))
    }
    async fn history(&self, _: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        Ok(Response::new(pb::HistoryResponse { entries: vec![bad_version()], next_page_token: None }))
    }
    async fn search(&self, _: Request<pb::SearchRequest>) -> Result<Response<pb::SearchResponse>, Status> {
        let version = pb::ResourceVersion {
            resource_type: "Patient".into(),
            id: "a".into(),
            operation: 1,
            last_updated: None,
            ..bad_version()
        };
        Ok(Response::new(pb::SearchResponse { entries: vec![version], ..Default::default() }))
    }
    async fn validate(&self, _: Request<pb::ValidateRequest>) -> Result<Response<pb::ValidateResponse>, Status> {
        Ok(Response::new(pb::ValidateResponse { operation_outcome: Bytes::from_static(b"not json") }))
    }
    async fn bundle(&self, _: Request<pb::BundleRequest>) -> Result<Response<pb::BundleResponse>, Status> {
        let entries = vec![
            pb::BundleEntryResult { status: 204, ..Default::default() },
            pb::BundleEntryResult { status: 0, ..Default::default() },
        ];
        Ok(Response::new(pb::BundleResponse { kind: pb::BundleKind::Batch.into(), entries, last_sequence: None }))
    }
}

#[tokio::test]
async fn malformed_responses_are_internal_errors_not_panics() {
    let server = TestServer::start(Server::builder().add_service(ResourceServiceServer::new(Broken))).await;
    let client = GrpcResourceClient::connect(server.endpoint.clone()).expect("valid endpoint");
    let ctx = ctx("acme");

    let create = CreateRequest { resource_type: patient(), body: Bytes::new(), if_none_exist: None };
    let err = client.create(&ctx, create).await.expect_err("missing result");
    assert_eq!(err.category, ErrorCategory::Internal);
    assert!(err.issues[0].diagnostics.contains("missing field `result`"), "{err}");

    let err = client.read(&ctx, patient(), id("a")).await.expect_err("unknown type in response");
    assert_eq!(
        err,
        FhirError::internal("malformed response from the resource service: unknown resource type 'Nonsense'")
    );
    let err = client.vread(&ctx, patient(), id("a"), 1).await.expect_err("unspecified operation");
    assert_eq!(err.category, ErrorCategory::Internal);
    let validate = fhirmesh_core::service::ValidateRequest {
        resource_type: patient(),
        id: None,
        resource: Some(Bytes::from_static(b"{}")),
        mode: fhirmesh_core::service::ValidateMode::General,
        profile: None,
    };
    let err = client.validate(&ctx, validate).await.expect_err("an outcome that is not JSON");
    assert_eq!(err.category, ErrorCategory::Internal);
    assert!(err.issues[0].diagnostics.contains("operation_outcome"), "{err}");
    let history = HistoryRequest { scope: HistoryScope::System, count: None, since: None, at: None, page_token: None };
    assert_eq!(client.history(&ctx, history).await.expect_err("bad entry").category, ErrorCategory::Internal);
    let search = SearchRequest {
        scope: SearchScope::System,
        params: vec![],
        strict: false,
        page_token: None,
        consistency_token: None,
    };
    let err = client.search(&ctx, search).await.expect_err("missing timestamp");
    assert!(err.issues[0].diagnostics.contains("last_updated"), "{err}");

    // Statuses without fhirmesh metadata map by code; internal details stay out of the error.
    let update = UpdateRequest { resource_type: patient(), id: id("a"), body: Bytes::new(), if_match: None };
    let err = client.update(&ctx, update).await.expect_err("internal");
    assert_eq!(err.category, ErrorCategory::Internal);
    assert!(!err.issues[0].diagnostics.contains("secret"), "{err}");
    let patch = PatchRequest {
        resource_type: patient(),
        id: id("a"),
        patch: PatchDocument::JsonPatch(Bytes::new()),
        if_match: None,
    };
    assert_eq!(client.patch(&ctx, patch).await.expect_err("unimplemented").category, ErrorCategory::Unsupported);
    let delete = DeleteRequest { resource_type: patient(), id: id("a"), if_match: None };
    assert_eq!(client.delete(&ctx, delete).await.expect_err("not found").category, ErrorCategory::NotFound);
    assert_eq!(client.index_status().await.expect_err("unavailable").category, ErrorCategory::Unavailable);
    let cond =
        ConditionalUpdateRequest { resource_type: patient(), criteria: vec![], body: Bytes::new(), if_match: None };
    let err = client.conditional_update(&ctx, cond).await.expect_err("missing result");
    assert_eq!(err.category, ErrorCategory::Internal);
    let cond = ConditionalDeleteRequest { resource_type: patient(), criteria: vec![] };
    let err = client.conditional_delete(&ctx, cond).await.expect_err("invalid id in the response");
    assert_eq!(err, FhirError::internal("resource service returned an invalid id"));
    let err = client.bundle(&ctx, BundleRequest { body: Bytes::new() }).await.expect_err("entry without a status");
    assert_eq!(
        err,
        FhirError::internal(
            "malformed response from the resource service: bundle entry 1: invalid HTTP status 0: expected 100 to 599"
        )
    );

    server.stop().await;
}

#[tokio::test]
async fn large_bodies_pass_and_oversized_ones_are_too_large() {
    let (_fake, server, client) = start_fake().await;
    let ctx = ctx("acme");
    // Above tonic's 4 MiB default in both directions.
    let big = "x".repeat(6 * 1024 * 1024);
    let created = client
        .create(
            &ctx,
            CreateRequest {
                resource_type: patient(),
                body: body(serde_json::json!({"resourceType": "Patient", "text": big})),
                if_none_exist: None,
            },
        )
        .await
        .expect("6 MiB create");
    assert_eq!(json(&created.version.body)["text"].as_str().map(str::len), Some(big.len()));
    server.stop().await;

    let small = TestServer::start(
        Server::builder().add_service(resource_service_server_with_limit(Arc::new(FakeService::default()), 1024)),
    )
    .await;
    let client = GrpcResourceClient::connect(small.endpoint.clone()).expect("valid endpoint");
    let err = client
        .create(
            &ctx,
            CreateRequest {
                resource_type: patient(),
                body: body(serde_json::json!({"resourceType": "Patient", "text": "y".repeat(4096)})),
                if_none_exist: None,
            },
        )
        .await
        .expect_err("over the server's limit");
    assert_eq!(err.category, ErrorCategory::TooLarge);
    small.stop().await;
}

#[tokio::test]
async fn unreachable_endpoint_is_unavailable() {
    // A port that was free a moment ago: nothing listens there.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);

    let client = GrpcResourceClient::connect(addr.to_string()).expect("valid endpoint");
    assert_eq!(client.endpoint(), format!("http://{addr}"));
    let err = client.read(&ctx("acme"), patient(), id("a")).await.expect_err("nobody listening");
    assert_eq!(err.category, ErrorCategory::Unavailable);
    let message = &err.issues[0].diagnostics;
    assert!(message.starts_with(&format!("resource service unreachable at http://{addr}")), "{message}");
}

#[tokio::test]
async fn invalid_endpoint_is_rejected() {
    assert!(GrpcResourceClient::connect("http://exa mple".to_owned()).is_err());
}

// ---------------------------------------------------------------------------------------------
// The event envelope.

fn event(operation: Operation, resource: Option<Bytes>) -> ResourceChanged {
    let tenant = TenantId::parse("acme").expect("tenant");
    ResourceChanged {
        idempotency_key: ResourceChanged::idempotency_key_for(&tenant, patient(), &id("p1"), 3),
        tenant,
        resource_type: patient(),
        id: id("p1"),
        version_id: 3,
        operation,
        last_updated: instant(7),
        sequence: 7,
        commit_end: 9,
        resource,
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    }
}

#[test]
fn events_round_trip_through_bytes() {
    for original in [
        event(Operation::Create, Some(body(serde_json::json!({"resourceType": "Patient", "id": "p1"})))),
        event(Operation::Update, Some(Bytes::from_static(b"{}"))),
        event(Operation::Delete, None),
    ] {
        let bytes = encode_resource_changed(&original);
        assert_eq!(decode_resource_changed(bytes.clone()), Ok(original.clone()));
        assert_eq!(decode_resource_changed(&bytes[..]), Ok(original.clone()));
        let wire = pb::ResourceChanged::from(&original);
        assert_eq!(wire.tenant, "acme");
        assert_eq!(wire.idempotency_key, "acme/Patient/p1/_history/3");
        assert_eq!(ResourceChanged::try_from(wire), Ok(original));
    }
}

#[test]
fn bad_events_are_rejected() {
    let good = pb::ResourceChanged::from(event(Operation::Update, None));

    let missing_key = pb::ResourceChanged { idempotency_key: String::new(), ..good.clone() };
    let derived = ResourceChanged::try_from(missing_key).expect("key derived");
    assert_eq!(derived.idempotency_key, "acme/Patient/p1/_history/3");

    let cases = [
        (pb::ResourceChanged { tenant: String::new(), ..good.clone() }, WireError::InvalidTenant(String::new())),
        (
            pb::ResourceChanged { resource_type: "Nope".into(), ..good.clone() },
            WireError::UnknownResourceType("Nope".into()),
        ),
        (pb::ResourceChanged { operation: 0, ..good.clone() }, WireError::UnknownOperation(0)),
        (pb::ResourceChanged { last_updated: None, ..good.clone() }, WireError::Missing("last_updated")),
    ];
    for (wire, expected) in cases {
        assert_eq!(ResourceChanged::try_from(wire), Err(expected));
    }
    assert!(matches!(
        ResourceChanged::try_from(pb::ResourceChanged { id: String::new(), ..good }),
        Err(WireError::InvalidId { .. })
    ));
    assert!(matches!(decode_resource_changed(&b"\xff\xff\xff"[..]), Err(WireError::Decode(_))));
}

// ---------------------------------------------------------------------------------------------
// Deadlines and retries.

/// A TCP server that accepts connections and never answers on them.
async fn silent_server() -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let handle = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (format!("http://{address}"), handle)
}

/// A TCP proxy to `target` that closes the first `drop_first` connections at once (a service
/// restarting) and forwards the others.
async fn flaky_proxy(target: String, drop_first: usize) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let target = target.trim_start_matches("http://").to_owned();
    let handle = tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((mut inbound, _)) = listener.accept().await {
            accepted += 1;
            if accepted <= drop_first {
                drop(inbound);
                continue;
            }
            let target = target.clone();
            tokio::spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(target).await.expect("the real server");
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (format!("http://{address}"), handle)
}

#[tokio::test]
async fn a_call_without_an_answer_fails_at_its_deadline() {
    let (endpoint, server) = silent_server().await;
    let policy = crate::CallPolicy { timeout: std::time::Duration::from_millis(300), read_retries: 0 };
    let client = GrpcResourceClient::connect(endpoint).expect("valid endpoint").with_policy(policy);
    let error = client.read(&ctx("acme"), patient(), id("p1")).await.expect_err("no answer comes");
    assert_eq!(error.category, ErrorCategory::Unavailable);
    assert!(error.to_string().contains("did not answer in time"), "{error}");
    server.abort();
}

#[tokio::test]
async fn reads_are_tried_again_after_a_dropped_connection_and_writes_are_not() {
    let (fake, server, direct) = start_fake().await;
    let created = direct
        .create(
            &ctx("acme"),
            CreateRequest {
                resource_type: patient(),
                body: body(serde_json::json!({"resourceType": "Patient"})),
                if_none_exist: None,
            },
        )
        .await
        .expect("create");
    let patient_id = created.version.id.clone();
    let policy = |read_retries| crate::CallPolicy { timeout: std::time::Duration::from_secs(5), read_retries };

    // A read whose first connection is dropped succeeds on the next one.
    let (proxy, first) = flaky_proxy(server.endpoint.clone(), 1).await;
    let client = GrpcResourceClient::connect(proxy).expect("valid endpoint").with_policy(policy(2));
    let read = client.read(&ctx("acme"), patient(), patient_id.clone()).await.expect("tried again");
    assert_eq!(read.id, patient_id);

    // Without retries the same read fails as unavailable.
    let (proxy, second) = flaky_proxy(server.endpoint.clone(), 1).await;
    let client = GrpcResourceClient::connect(proxy).expect("valid endpoint").with_policy(policy(0));
    let error = client.read(&ctx("acme"), patient(), patient_id).await.expect_err("not tried again");
    assert_eq!(error.category, ErrorCategory::Unavailable, "{error}");

    // A write is never tried again, retries or not: nothing was written.
    let (proxy, third) = flaky_proxy(server.endpoint.clone(), 1).await;
    let client = GrpcResourceClient::connect(proxy).expect("valid endpoint").with_policy(policy(2));
    let request = CreateRequest {
        resource_type: patient(),
        body: body(serde_json::json!({"resourceType": "Patient"})),
        if_none_exist: None,
    };
    let error = client.create(&ctx("acme"), request).await.expect_err("the write is not tried again");
    assert_eq!(error.category, ErrorCategory::Unavailable, "{error}");
    assert_eq!(fake.0.lock().expect("fake").versions.len(), 1, "only the first Patient exists");

    for proxy in [first, second, third] {
        proxy.abort();
    }
    server.stop().await;
}
