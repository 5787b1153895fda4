use bytes::Bytes;
use fhirmesh_fhir::LogicalId;
use time::OffsetDateTime;

use super::*;
use crate::model::Operation;

fn binary() -> ResourceType {
    ResourceType::parse("Binary").expect("Binary is a type")
}

fn pointer(key: &str) -> ContentRef {
    ContentRef {
        key: key.to_owned(),
        size: Some(5_000_000),
        sha256: Some("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into()),
    }
}

fn binary_with(content: &ContentRef) -> Value {
    let mut resource = json!({"resourceType": "Binary", "contentType": "application/pdf", "data": "AAAA"});
    content.attach(&mut resource);
    resource
}

fn version(resource: &Value) -> ResourceVersion {
    ResourceVersion {
        resource_type: binary(),
        id: LogicalId::parse("b1").expect("id"),
        version_id: 1,
        last_updated: OffsetDateTime::UNIX_EPOCH,
        operation: Operation::Create,
        body: Some(Bytes::from(resource.to_string())),
        sequence: 1,
    }
}

#[test]
fn a_pointer_replaces_data_and_reads_back() {
    let content = pointer("binary/0123456789abcdef");
    let resource = binary_with(&content);
    assert!(resource.get("data").is_none(), "the inline data is gone");
    assert_eq!(resource["_data"]["extension"][0]["url"], CONTENT_EXTENSION);
    assert_eq!(ContentRef::of(&resource), Ok(Some(content)));
    let plain = json!({"resourceType": "Binary", "contentType": "text/plain", "data": "aGk="});
    assert_eq!(ContentRef::of(&plain), Ok(None));
    let other_extension =
        json!({"resourceType": "Binary", "_data": {"extension": [{"url": "http://x", "valueString": "y"}]}});
    assert_eq!(ContentRef::of(&other_extension), Ok(None));
}

#[test]
fn a_presigned_pointer_has_neither_size_nor_hash() {
    let content = ContentRef { key: "binary/feed".into(), size: None, sha256: None };
    let resource = binary_with(&content);
    assert_eq!(resource["_data"]["extension"][0]["extension"].as_array().map(Vec::len), Some(1), "{resource}");
    assert_eq!(ContentRef::of(&resource), Ok(Some(content)));
}

#[test]
fn malformed_pointers_are_400s_at_the_extension() {
    let good = binary_with(&pointer("binary/0123"));
    let mut with_data = good.clone();
    with_data["data"] = json!("AAAA");
    let mut outside = good.clone();
    outside["_data"]["extension"][0]["extension"][0]["valueString"] = json!("export/job/Patient-1.ndjson");
    let mut escaping = good.clone();
    escaping["_data"]["extension"][0]["extension"][0]["valueString"] = json!("binary/../other");
    let mut no_key = good.clone();
    no_key["_data"]["extension"][0]["extension"].as_array_mut().expect("parts").remove(0);
    let mut bad_size = good.clone();
    bad_size["_data"]["extension"][0]["extension"][1]["valueUnsignedInt"] = json!("big");
    let mut bad_hash = good.clone();
    bad_hash["_data"]["extension"][0]["extension"][2]["valueBase64Binary"] = json!(7);
    for (name, resource) in [
        ("with data", with_data),
        ("outside binary/", outside),
        ("escaping", escaping),
        ("no key", no_key),
        ("bad size", bad_size),
        ("bad hash", bad_hash),
    ] {
        let error = ContentRef::of(&resource).expect_err(name);
        assert_eq!(error.category, ErrorCategory::Invalid, "{name}");
        assert_eq!(error.issues[0].expression.as_deref(), Some("Binary.data.extension"), "{name}");
    }
}

#[test]
fn only_this_request_s_upload_or_the_current_pointer_may_be_written() {
    let uploaded = pointer("binary/aaaa");
    let upload_ctx = RequestContext { binary_upload: Some(uploaded.key.clone()), ..RequestContext::default() };
    let plain_ctx = RequestContext::default();
    let new = binary_with(&uploaded);

    // The gateway's upload for this request.
    assert_eq!(check_write(&upload_ctx, binary(), Some(&new), None), Ok(()));
    // The same pointer without the upload: a client forging it.
    let forged = check_write(&plain_ctx, binary(), Some(&new), None).expect_err("forged");
    assert_eq!(forged.category, ErrorCategory::Invalid);
    // Another upload's key.
    let other_ctx = RequestContext { binary_upload: Some("binary/bbbb".into()), ..RequestContext::default() };
    assert!(check_write(&other_ctx, binary(), Some(&new), None).is_err());

    // Keeping the current version's pointer (an update of contentType, a PATCH) is fine.
    let current = version(&new);
    let mut renamed = new.clone();
    renamed["contentType"] = json!("application/octet-stream");
    assert_eq!(check_write(&plain_ctx, binary(), Some(&renamed), Some(&current)), Ok(()));
    // A changed size or hash is not the current pointer.
    let mut resized = uploaded.clone();
    resized.size = Some(1);
    assert!(check_write(&plain_ctx, binary(), Some(&binary_with(&resized)), Some(&current)).is_err());
    // Pointing an existing Binary at other content.
    let elsewhere = binary_with(&pointer("binary/cccc"));
    assert!(check_write(&plain_ctx, binary(), Some(&elsewhere), Some(&current)).is_err());

    // Without a pointer, or not a Binary, or a delete: nothing to check.
    let inline = json!({"resourceType": "Binary", "contentType": "text/plain", "data": "aGk="});
    assert_eq!(check_write(&plain_ctx, binary(), Some(&inline), Some(&current)), Ok(()));
    assert_eq!(check_write(&plain_ctx, binary(), None, Some(&current)), Ok(()));
    let patient = ResourceType::parse("Patient").expect("type");
    assert_eq!(check_write(&plain_ctx, patient, Some(&new), None), Ok(()));
}
