//! `transaction` Bundles: every entry takes effect or none does (R4 http.html#transaction).
//!
//! Decide, then write once: entries are planned in the spec's processing order (DELETE, POST,
//! PUT/PATCH, GET/HEAD) against the current versions — new ids allocated, conditional creates,
//! updates and deletes resolved by search, `ifMatch` checked — then every `fullUrl` and
//! conditional reference is rewritten to the `Type/id` it resolved to, every resource validated
//! (schema and write rules), the per-tenant limits checked on the transaction as a whole (three
//! new active Subscriptions count three), and all versions go to the store in ONE atomic commit
//! whose expectations pin the versions the plan read. A concurrent writer that changed one of
//! them makes the commit fail as a whole; the transaction is then planned again from the new
//! state (bounded), so there is no lost update and no lock to deadlock on. GET/HEAD entries are
//! answered after the commit and see its writes.

use std::collections::{HashMap, HashSet};

use fhirmesh_fhir::patch::{apply_fhirpath_patch, apply_json_patch};
use fhirmesh_fhir::{LogicalId, ResourceType};
use serde_json::Value;

use super::entry::{Entry, Method, Target};
use super::references::{self, RewriteError};
use super::{in_entry, read_entry};
use crate::error::{ErrorCategory, FhirError, FhirResult};
use crate::interactions::body::{self, IdRule, Stamp};
use crate::interactions::limits::LimitedWrites;
use crate::interactions::{FhirResources, Reach};
use crate::model::{Operation, ResourceVersion};
use crate::ports::{DynWriteRules, Expected, StoreError, VersionWrite, WriteRules};
use crate::service::{BundleKind, BundleResult, EntryResult, PatchDocument, RequestContext};

pub(super) async fn transaction(
    svc: &FhirResources,
    ctx: &RequestContext,
    entries: &[Entry],
    reaches: &[Reach],
) -> FhirResult<BundleResult> {
    for _ in 0..=svc.config.max_write_retries {
        if let Some(result) = attempt(svc, ctx, entries, reaches).await? {
            return Ok(result);
        }
        tracing::debug!("transaction lost a version race; planning it again");
    }
    Err(FhirError::new(
        ErrorCategory::Conflict,
        "the resources this transaction changes are being changed by other writers at the same time; retry it",
    ))
}

/// One version the transaction will write.
struct Pending {
    entry: usize,
    resource_type: ResourceType,
    id: LogicalId,
    current: Option<ResourceVersion>,
    change: Change,
    /// The entry's status once written: 201 (created), 200 (updated), 204 (deleted).
    status: u16,
}

enum Change {
    /// A new version of `resource`: `Create` for a POST, `Update` for a PUT or PATCH (as the
    /// single interactions record them).
    Put {
        resource: Value,
        id_rule: IdRule,
        operation: Operation,
    },
    Delete,
}

#[derive(Default)]
struct Plan {
    results: Vec<Option<EntryResult>>,
    writes: Vec<Pending>,
    /// `fullUrl` → the `Type/id` it became.
    full_urls: HashMap<String, String>,
    /// Resources written, and by which entry (one entry per resource).
    touched: HashMap<(ResourceType, LogicalId), usize>,
    /// GET/HEAD entries, answered after the commit.
    reads: Vec<usize>,
}

impl Plan {
    fn touch(&mut self, entry: &Entry, resource_type: ResourceType, id: &LogicalId) -> FhirResult<()> {
        if let Some(other) = self.touched.insert((resource_type, id.clone()), entry.index) {
            return Err(FhirError::invalid(format!(
                "{resource_type}/{id} is changed by entry {other} and entry {} of this transaction; a transaction changes a resource at most once",
                entry.index
            ))
            .at(format!("{}.request", entry.path())));
        }
        Ok(())
    }

    /// Records what the entry's `fullUrl` became. A RESTful absolute `fullUrl`
    /// (`http://a/fhir/Patient/x`) also answers for the relative reference `Patient/x`, which
    /// resolves against the same base (R4 bundle.html#references).
    fn map_full_url(&mut self, entry: &Entry, resource_type: ResourceType, id: &LogicalId) {
        let Some(full_url) = &entry.full_url else { return };
        let target = format!("{resource_type}/{id}");
        if !references::is_bundle_local(full_url) {
            let mut tail = full_url.rsplit('/');
            if let (Some(old_id), Some(type_name)) = (tail.next(), tail.next())
                && type_name == resource_type.as_str()
            {
                self.full_urls.entry(format!("{type_name}/{old_id}")).or_insert_with(|| target.clone());
            }
        }
        self.full_urls.insert(full_url.clone(), target);
    }

    fn done(&mut self, entry: &Entry, result: EntryResult) {
        self.results[entry.index] = Some(result);
    }
}

/// Plans and commits once; `None` when the commit lost a version race.
async fn attempt(
    svc: &FhirResources,
    ctx: &RequestContext,
    entries: &[Entry],
    reaches: &[Reach],
) -> FhirResult<Option<BundleResult>> {
    let mut plan = Plan { results: vec![None; entries.len()], ..Plan::default() };
    let currents = current_versions(svc, ctx, entries).await?;
    let mut ordered: Vec<&Entry> = entries.iter().collect();
    ordered.sort_by_key(|entry| entry.method.transaction_rank());
    for entry in ordered {
        plan_entry(svc, ctx, entry, &currents, &mut plan).await.map_err(|err| in_entry(err, entry))?;
    }
    resolve_references(svc, ctx, entries, &mut plan).await?;
    check_reach(entries, reaches, &plan.writes)?;

    let last_updated = body::now();
    let rules = svc.config.write_rules.clone();
    let writes = prepare(std::mem::take(&mut plan.writes), entries, last_updated, rules).await?;
    let mut limited = LimitedWrites::default();
    for (pending, _) in &writes {
        let new = match &pending.change {
            Change::Put { resource, .. } => Some(resource),
            Change::Delete => None,
        };
        crate::binary::check_write(ctx, pending.resource_type, new, pending.current.as_ref())
            .map_err(|err| in_entry(err, &entries[pending.entry]))?;
        let target = (pending.resource_type, &pending.id);
        limited.record(
            svc.config.write_rules.as_deref(),
            pending.entry,
            target,
            new,
            pending.current.as_ref(),
            last_updated,
        );
    }
    limited.check(svc, &ctx.tenant).await.map_err(|(index, err)| in_entry(err, &entries[index]))?;
    let last_sequence = if writes.is_empty() {
        None
    } else {
        let version_writes = writes
            .iter()
            .map(|(_, write)| VersionWrite { traceparent: ctx.traceparent.clone(), ..write.clone() })
            .collect();
        match svc.store.commit(&ctx.tenant, version_writes).await {
            Ok(receipt) => {
                for (offset, (pending, write)) in writes.into_iter().enumerate() {
                    let version = ResourceVersion {
                        resource_type: write.resource_type,
                        id: write.id,
                        version_id: write.version_id,
                        last_updated: write.last_updated,
                        operation: write.operation,
                        body: write.body,
                        sequence: receipt.first_sequence + offset as u64,
                    };
                    let result = if write.operation == Operation::Delete {
                        EntryResult { status: 204, location: None, version: None, search: None, error: None }
                    } else {
                        EntryResult {
                            status: pending.status,
                            location: Some(location(&version)),
                            version: Some(version),
                            search: None,
                            error: None,
                        }
                    };
                    // A conditional delete of several resources reports once, with its status.
                    plan.results[pending.entry].get_or_insert(result);
                }
                Some(receipt.last_sequence)
            }
            Err(StoreError::Conflict { .. }) => return Ok(None),
            Err(err) => return Err(err.into()),
        }
    };

    for index in std::mem::take(&mut plan.reads) {
        plan.results[index] = Some(read_entry(svc, ctx, &entries[index], last_sequence).await);
    }
    let entries = plan
        .results
        .into_iter()
        .enumerate()
        .map(|(index, result)| {
            result.ok_or_else(|| FhirError::internal(format!("transaction entry {index} produced no result")))
        })
        .collect::<FhirResult<Vec<_>>>()?;
    Ok(Some(BundleResult { kind: BundleKind::Transaction, entries, last_sequence }))
}

/// A caller whose grant reaches only part of a type (a patient's compartment, a fine-grained scope)
/// changes only resources that are, and stay, within it (`reaches[i]` is entry `i`'s): checked on
/// the planned writes, with references resolved, before anything is committed.
fn check_reach(entries: &[Entry], reaches: &[Reach], writes: &[Pending]) -> FhirResult<()> {
    for pending in writes {
        let new = match &pending.change {
            Change::Put { resource, .. } => Some(resource),
            Change::Delete => None,
        };
        reaches[pending.entry]
            .check_write(pending.resource_type, &pending.id, pending.current.as_ref(), new)
            .map_err(|err| in_entry(err, &entries[pending.entry]))?;
    }
    Ok(())
}

/// `Type/id/_history/vid`.
pub(super) fn location(version: &ResourceVersion) -> String {
    format!("{}/{}/_history/{}", version.resource_type, version.id, version.version_id)
}

/// The current versions of every resource an entry names by id, in one store round trip.
async fn current_versions(
    svc: &FhirResources,
    ctx: &RequestContext,
    entries: &[Entry],
) -> FhirResult<HashMap<(ResourceType, LogicalId), ResourceVersion>> {
    let keys: Vec<(ResourceType, LogicalId)> = entries
        .iter()
        .filter(|entry| matches!(entry.method, Method::Put | Method::Patch | Method::Delete))
        .filter_map(|entry| match &entry.target {
            Target::Instance(resource_type, id) => Some((*resource_type, id.clone())),
            _ => None,
        })
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let found = svc.store.read_many(&ctx.tenant, &keys).await?;
    Ok(keys.into_iter().zip(found).filter_map(|(key, version)| Some((key, version?))).collect())
}

async fn plan_entry(
    svc: &FhirResources,
    ctx: &RequestContext,
    entry: &Entry,
    currents: &HashMap<(ResourceType, LogicalId), ResourceVersion>,
    plan: &mut Plan,
) -> FhirResult<()> {
    let current_of = |resource_type: ResourceType, id: &LogicalId| currents.get(&(resource_type, id.clone())).cloned();
    match (entry.method, &entry.target) {
        (Method::Get | Method::Head, _) => plan.reads.push(entry.index),
        (Method::Delete, Target::Instance(resource_type, id)) => {
            let current = current_of(*resource_type, id);
            check_if_match(entry, *resource_type, id, current.as_ref())?;
            plan.touch(entry, *resource_type, id)?;
            match current {
                Some(current) if !current.is_deleted() => plan.writes.push(Pending {
                    entry: entry.index,
                    resource_type: *resource_type,
                    id: id.clone(),
                    current: Some(current),
                    change: Change::Delete,
                    status: 204,
                }),
                // Deleting what is absent or already deleted succeeds without writing.
                _ => plan.done(entry, no_content()),
            }
        }
        (Method::Delete, Target::Search(resource_type, params)) => {
            let limit = if svc.config.conditional_delete_multiple { svc.config.max_page_size } else { 2 };
            let found = super::super::search::find(svc, &ctx.tenant, *resource_type, params, limit).await?;
            if found.len() > 1 && !svc.config.conditional_delete_multiple {
                return Err(FhirError::new(
                    ErrorCategory::PreconditionFailed,
                    format!("the conditional delete criteria match more than one {resource_type}"),
                ));
            }
            if found.is_empty() {
                plan.done(entry, no_content());
            }
            for current in found {
                plan.touch(entry, *resource_type, &current.id)?;
                plan.writes.push(Pending {
                    entry: entry.index,
                    resource_type: *resource_type,
                    id: current.id.clone(),
                    current: Some(current),
                    change: Change::Delete,
                    status: 204,
                });
            }
        }
        (Method::Post, Target::Type(resource_type)) => {
            let resource = entry_resource(entry)?;
            if let Some(query) = &entry.if_none_exist {
                // The query part; some clients (and a spec example) send `Type?query`.
                let query_part = query.split_once('?').map_or(query.as_str(), |(_, q)| q);
                let params: Vec<(String, String)> =
                    form_urlencoded::parse(query_part.as_bytes()).into_owned().collect();
                if params.is_empty() {
                    return Err(FhirError::invalid("ifNoneExist must carry search parameters")
                        .at(format!("{}.request.ifNoneExist", entry.path())));
                }
                let mut found = super::super::search::find(svc, &ctx.tenant, *resource_type, &params, 2).await?;
                match found.len() {
                    0 => {}
                    1 => {
                        // Already there: the entry resolves to it, nothing is written.
                        let existing = found.remove(0);
                        plan.map_full_url(entry, *resource_type, &existing.id);
                        plan.done(
                            entry,
                            EntryResult {
                                status: 200,
                                location: Some(location(&existing)),
                                version: Some(existing),
                                search: None,
                                error: None,
                            },
                        );
                        return Ok(());
                    }
                    _ => {
                        return Err(FhirError::new(
                            ErrorCategory::PreconditionFailed,
                            format!("ifNoneExist '{query}' matches more than one {resource_type}"),
                        )
                        .at(format!("{}.request.ifNoneExist", entry.path())));
                    }
                }
            }
            let id = LogicalId::generate();
            plan.touch(entry, *resource_type, &id)?;
            plan.map_full_url(entry, *resource_type, &id);
            plan.writes.push(Pending {
                entry: entry.index,
                resource_type: *resource_type,
                id,
                current: None,
                change: Change::Put { resource, id_rule: IdRule::Replace, operation: Operation::Create },
                status: 201,
            });
        }
        (Method::Put, Target::Instance(resource_type, id)) => {
            let resource = entry_resource(entry)?;
            let current = current_of(*resource_type, id);
            check_if_match(entry, *resource_type, id, current.as_ref())?;
            if current.is_none() && !svc.config.update_create {
                return Err(FhirError::new(
                    ErrorCategory::MethodNotAllowed,
                    format!("{resource_type}/{id} does not exist and this server does not allow update-as-create"),
                ));
            }
            plan.touch(entry, *resource_type, id)?;
            plan.map_full_url(entry, *resource_type, id);
            let created = current.as_ref().is_none_or(ResourceVersion::is_deleted);
            plan.writes.push(Pending {
                entry: entry.index,
                resource_type: *resource_type,
                id: id.clone(),
                current,
                change: Change::Put { resource, id_rule: IdRule::MustMatch, operation: Operation::Update },
                status: if created { 201 } else { 200 },
            });
        }
        (Method::Put, Target::Search(resource_type, params)) => {
            let mut resource = entry_resource(entry)?;
            let mut found = super::super::search::find(svc, &ctx.tenant, *resource_type, params, 2).await?;
            let (id, current) = match found.len() {
                0 => (LogicalId::generate(), None),
                1 => {
                    let matched = found.remove(0);
                    (matched.id.clone(), Some(matched))
                }
                _ => {
                    return Err(FhirError::new(
                        ErrorCategory::PreconditionFailed,
                        format!("the conditional update criteria match more than one {resource_type}"),
                    ));
                }
            };
            match resource.get("id") {
                Some(Value::String(body_id)) if current.is_some() && body_id != id.as_str() => {
                    return Err(FhirError::invalid(format!(
                        "the resource id '{body_id}' is not the id of the resource the criteria matched ('{id}')"
                    ))
                    .at(format!("{resource_type}.id")));
                }
                _ => resource["id"] = Value::String(id.as_str().to_owned()),
            }
            check_if_match(entry, *resource_type, &id, current.as_ref())?;
            plan.touch(entry, *resource_type, &id)?;
            plan.map_full_url(entry, *resource_type, &id);
            let created = current.is_none();
            plan.writes.push(Pending {
                entry: entry.index,
                resource_type: *resource_type,
                id,
                current,
                change: Change::Put { resource, id_rule: IdRule::MustMatch, operation: Operation::Update },
                status: if created { 201 } else { 200 },
            });
        }
        (Method::Patch, Target::Instance(resource_type, id)) => {
            let current = current_of(*resource_type, id);
            check_if_match(entry, *resource_type, id, current.as_ref())?;
            let current = match current {
                Some(current) if !current.is_deleted() => current,
                Some(_) => {
                    return Err(FhirError::new(ErrorCategory::Gone, format!("{resource_type}/{id} was deleted")));
                }
                None => return Err(FhirError::not_found(format!("{resource_type}/{id} does not exist"))),
            };
            let bytes = current.body.as_deref().unwrap_or_default();
            let mut resource: Value = serde_json::from_slice(bytes)
                .map_err(|err| FhirError::internal(format!("stored resource is not JSON: {err}")))?;
            match entry.patch_document()? {
                PatchDocument::JsonPatch(document) => apply_json_patch(&mut resource, &body::parse_json(&document)?),
                PatchDocument::FhirPathPatch(document) => {
                    apply_fhirpath_patch(&mut resource, &body::parse_json(&document)?)
                }
            }
            .map_err(|err| FhirError::with_issues(ErrorCategory::Unprocessable, vec![err.to_issue()]))?;
            plan.touch(entry, *resource_type, id)?;
            plan.map_full_url(entry, *resource_type, id);
            plan.writes.push(Pending {
                entry: entry.index,
                resource_type: *resource_type,
                id: id.clone(),
                current: Some(current),
                change: Change::Put { resource, id_rule: IdRule::MustMatch, operation: Operation::Update },
                status: 200,
            });
        }
        (method, target) => {
            return Err(FhirError::invalid(format!(
                "{method:?} on {target:?} is not an interaction a transaction entry can carry"
            ))
            .at(format!("{}.request", entry.path())));
        }
    }
    Ok(())
}

fn no_content() -> EntryResult {
    EntryResult { status: 204, location: None, version: None, search: None, error: None }
}

fn entry_resource(entry: &Entry) -> FhirResult<Value> {
    entry
        .resource
        .clone()
        .ok_or_else(|| FhirError::invalid("this entry needs a resource").at(format!("{}.resource", entry.path())))
}

fn check_if_match(
    entry: &Entry,
    resource_type: ResourceType,
    id: &LogicalId,
    current: Option<&ResourceVersion>,
) -> FhirResult<()> {
    let Some(expected) = entry.if_match else { return Ok(()) };
    match current {
        Some(current) if current.version_id == expected => Ok(()),
        Some(current) => Err(FhirError::new(
            ErrorCategory::PreconditionFailed,
            format!(
                "{resource_type}/{id} is at version {}, not the version {expected} named in ifMatch",
                current.version_id
            ),
        )
        .at(format!("{}.request.ifMatch", entry.path()))),
        None => Err(FhirError::new(
            ErrorCategory::PreconditionFailed,
            format!("{resource_type}/{id} does not exist, so ifMatch W/\"{expected}\" cannot hold"),
        )
        .at(format!("{}.request.ifMatch", entry.path()))),
    }
}

/// Resolves every conditional reference (against what is stored: exactly one match, or the
/// transaction fails naming the entry) and rewrites every reference to a `fullUrl` of the Bundle.
async fn resolve_references(
    svc: &FhirResources,
    ctx: &RequestContext,
    entries: &[Entry],
    plan: &mut Plan,
) -> FhirResult<()> {
    let mut conditional: HashMap<String, (usize, Option<String>)> = HashMap::new();
    for pending in &mut plan.writes {
        if let Change::Put { resource, .. } = &mut pending.change {
            let entry = pending.entry;
            let mut collect = |reference: &str| -> Result<Option<String>, String> {
                if references::is_conditional(reference) {
                    conditional.entry(reference.to_owned()).or_insert((entry, None));
                }
                Ok(None)
            };
            references::rewrite(resource, &mut collect).map_err(|err| rewrite_error(&entries[entry], err))?;
        }
    }
    for (reference, (entry, target)) in &mut conditional {
        let (type_name, query) = reference.split_once('?').unwrap_or_default();
        let Some(resource_type) = ResourceType::parse(type_name) else {
            return Err(FhirError::internal(format!("'{reference}' was taken for a conditional reference")));
        };
        let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let found = super::super::search::find(svc, &ctx.tenant, resource_type, &params, 2)
            .await
            .map_err(|err| in_entry(err, &entries[*entry]))?;
        match found.as_slice() {
            [one] => *target = Some(format!("{}/{}", one.resource_type, one.id)),
            [] => {
                return Err(FhirError::new(
                    ErrorCategory::PreconditionFailed,
                    format!("the conditional reference '{reference}' matches no resource"),
                )
                .at(format!("{}.resource", entries[*entry].path())));
            }
            _ => {
                return Err(FhirError::new(
                    ErrorCategory::PreconditionFailed,
                    format!("the conditional reference '{reference}' matches more than one resource"),
                )
                .at(format!("{}.resource", entries[*entry].path())));
            }
        }
    }
    let full_urls = &plan.full_urls;
    for pending in &mut plan.writes {
        if let Change::Put { resource, .. } = &mut pending.change {
            let mut resolve = |reference: &str| -> Result<Option<String>, String> {
                if let Some(target) = full_urls.get(reference) {
                    return Ok(Some(target.clone()));
                }
                if let Some((_, Some(target))) = conditional.get(reference) {
                    return Ok(Some(target.clone()));
                }
                if references::is_bundle_local(reference) {
                    return Err(format!("'{reference}' is not the fullUrl of an entry of this transaction"));
                }
                Ok(None)
            };
            references::rewrite(resource, &mut resolve).map_err(|err| rewrite_error(&entries[pending.entry], err))?;
        }
    }
    Ok(())
}

fn rewrite_error(entry: &Entry, err: RewriteError) -> FhirError {
    FhirError::invalid(err.message).at(format!("{}.resource.{}", entry.path(), err.path))
}

/// Validates (the R4 schema and the write `rules`) and stamps every new version — on the blocking
/// pool, in as many chunks as there are cores — and turns the plan into store writes, in entry
/// order.
async fn prepare(
    mut pending: Vec<Pending>,
    entries: &[Entry],
    last_updated: time::OffsetDateTime,
    rules: Option<DynWriteRules>,
) -> FhirResult<Vec<(Pending, VersionWrite)>> {
    pending.sort_by_key(|p| p.entry);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let chunk = pending.len().div_ceil(cores).max(1);
    let mut tasks = Vec::new();
    let mut rest = pending;
    while !rest.is_empty() {
        let tail = rest.split_off(chunk.min(rest.len()));
        let part = std::mem::replace(&mut rest, tail);
        let rules = rules.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            part.into_iter().map(|pending| to_write(pending, last_updated, rules.as_deref())).collect::<Vec<_>>()
        }));
    }
    let mut writes = Vec::new();
    for task in tasks {
        let part = task.await.map_err(|_| FhirError::internal("validation task failed"))?;
        for result in part {
            match result {
                Ok(write) => writes.push(write),
                Err((index, err)) => return Err(in_entry(err, &entries[index])),
            }
        }
    }
    Ok(writes)
}

fn to_write(
    pending: Pending,
    last_updated: time::OffsetDateTime,
    rules: Option<&dyn WriteRules>,
) -> Result<(Pending, VersionWrite), (usize, FhirError)> {
    let version_id = pending.current.as_ref().map_or(1, |current| current.version_id + 1);
    let expected = pending.current.as_ref().map_or(Expected::Absent, |current| Expected::Version(current.version_id));
    let (operation, body) = match &pending.change {
        Change::Delete => (Operation::Delete, None),
        Change::Put { resource, id_rule, operation } => {
            let stamp = Stamp { id: pending.id.clone(), id_rule: *id_rule, version_id, last_updated };
            let body = body::prepare_blocking(resource.clone(), pending.resource_type, &stamp, rules)
                .map_err(|err| (pending.entry, err))?;
            (*operation, Some(body))
        }
    };
    let write = VersionWrite {
        resource_type: pending.resource_type,
        id: pending.id.clone(),
        expected,
        version_id,
        last_updated,
        operation,
        body,
        traceparent: None,
    };
    Ok((pending, write))
}
