//! Content negotiation and request headers: Accept/_format, Content-Type, Prefer, If-Match, and
//! the result-shaping parameters `_pretty`, `_summary`, `_elements`.

use fhirmesh_core::{ErrorCategory, FhirError, FhirResult};
use fhirmesh_fhir::elements::SummaryMode;
use http::HeaderMap;
use http::header::{ACCEPT, CONTENT_TYPE};

/// How to shape and print a response.
#[derive(Debug, Clone, Default)]
pub(crate) struct Presentation {
    pub pretty: bool,
    pub summary: Option<SummaryMode>,
    pub elements: Option<Vec<String>>,
}

impl Presentation {
    /// `true` when the stored bytes can be sent as they are.
    pub fn is_plain(&self) -> bool {
        !self.pretty && self.summary.is_none() && self.elements.is_none()
    }
}

/// Checks `_format`/`Accept` and reads `_pretty`, `_summary`, `_elements`.
pub(crate) fn presentation(headers: &HeaderMap, params: &[(String, String)]) -> FhirResult<Presentation> {
    let mut out = Presentation::default();
    let mut format_given = false;
    for (name, value) in params {
        match name.as_str() {
            "_format" => {
                format_given = true;
                check_format(value)?;
            }
            "_pretty" => {
                out.pretty = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    other => return Err(FhirError::invalid(format!("_pretty must be true or false, not '{other}'"))),
                }
            }
            "_summary" => {
                out.summary = Some(SummaryMode::parse(value).ok_or_else(|| {
                    FhirError::invalid(format!("_summary must be one of true, text, data, count, false; not '{value}'"))
                })?);
            }
            "_elements" => {
                let list: Vec<String> =
                    value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
                out.elements.get_or_insert_with(Vec::new).extend(list);
            }
            _ => {}
        }
    }
    if !format_given && let Some(accept) = headers.get(ACCEPT) {
        let accept = accept.to_str().map_err(|_| FhirError::invalid("Accept header is not ASCII"))?;
        check_accept(accept)?;
    }
    Ok(out)
}

fn check_format(value: &str) -> FhirResult<()> {
    let base = value.split(';').next().unwrap_or_default().trim();
    if is_json(base) { Ok(()) } else { Err(not_acceptable(value)) }
}

fn check_accept(accept: &str) -> FhirResult<()> {
    let acceptable = accept
        .split(',')
        .map(|item| item.split(';').next().unwrap_or_default().trim())
        .any(|media| media.is_empty() || media == "*/*" || media == "application/*" || is_json(media));
    if acceptable { Ok(()) } else { Err(not_acceptable(accept)) }
}

/// A FHIR format (JSON, which this server speaks, or XML, which it refuses with 406).
pub(crate) fn is_fhir_media(media: &str) -> bool {
    is_json(media)
        || matches!(media, "xml" | "application/xml" | "application/fhir+xml" | "application/xml+fhir" | "text/xml")
}

fn is_json(media: &str) -> bool {
    matches!(media, "json" | "application/json" | "application/fhir+json" | "application/json+fhir" | "text/json")
}

fn not_acceptable(asked: &str) -> FhirError {
    FhirError::new(
        ErrorCategory::NotAcceptable,
        format!(
            "cannot answer in '{asked}': this server speaks JSON only (application/fhir+json); XML is not supported"
        ),
    )
}

/// Accepts a FHIR JSON request body (or no Content-Type at all).
pub(crate) fn check_json_body(headers: &HeaderMap) -> FhirResult<()> {
    match content_type(headers)? {
        None => Ok(()),
        Some(media) if is_json(&media) => Ok(()),
        Some(media) => Err(unsupported_media(&media, "application/fhir+json")),
    }
}

/// The patch format a PATCH request body is in.
pub(crate) enum PatchFormat {
    Json,
    FhirPath,
}

pub(crate) fn patch_format(headers: &HeaderMap) -> FhirResult<PatchFormat> {
    match content_type(headers)?.as_deref() {
        Some("application/json-patch+json") => Ok(PatchFormat::Json),
        Some(media) if is_json(media) => Ok(PatchFormat::FhirPath),
        Some(media) => Err(unsupported_media(media, "application/json-patch+json or application/fhir+json")),
        None => Err(FhirError::new(
            ErrorCategory::UnsupportedMediaType,
            "PATCH needs a Content-Type: application/json-patch+json (JSON Patch) or application/fhir+json (FHIRPath Patch)",
        )),
    }
}

fn content_type(headers: &HeaderMap) -> FhirResult<Option<String>> {
    let Some(value) = headers.get(CONTENT_TYPE) else { return Ok(None) };
    let value = value.to_str().map_err(|_| FhirError::invalid("Content-Type header is not ASCII"))?;
    Ok(Some(value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()))
}

fn unsupported_media(media: &str, expected: &str) -> FhirError {
    FhirError::new(
        ErrorCategory::UnsupportedMediaType,
        format!("Content-Type '{media}' is not supported here; send {expected}"),
    )
}

/// `Prefer: return=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Return {
    Minimal,
    #[default]
    Representation,
    OperationOutcome,
}

pub(crate) fn prefer_return(headers: &HeaderMap) -> Return {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|pref| pref.trim().strip_prefix("return="))
        .find_map(|value| match value.trim_matches('"') {
            "minimal" => Some(Return::Minimal),
            "representation" => Some(Return::Representation),
            "OperationOutcome" => Some(Return::OperationOutcome),
            _ => None,
        })
        .unwrap_or_default()
}

/// `If-Match: W/"3"` (the weak form FHIR uses; a strong `"3"` is accepted too).
pub(crate) fn if_match(headers: &HeaderMap) -> FhirResult<Option<u64>> {
    let Some(value) = headers.get(http::header::IF_MATCH) else { return Ok(None) };
    let raw = value.to_str().unwrap_or_default().trim();
    let version = raw
        .strip_prefix("W/")
        .unwrap_or(raw)
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.parse::<u64>().ok());
    match version {
        Some(v) => Ok(Some(v)),
        None => Err(FhirError::invalid(format!("If-Match '{raw}' is not a version ETag like W/\"3\""))),
    }
}

/// `Prefer: handling=strict` (search: unknown parameters are errors, not ignored).
pub(crate) fn prefer_strict(headers: &HeaderMap) -> bool {
    prefers(headers, "handling=strict")
}

/// Whether a `Prefer` header carries `preference` (e.g. `respond-async`, `handling=lenient`).
pub(crate) fn prefers(headers: &HeaderMap, preference: &str) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|pref| pref.trim().eq_ignore_ascii_case(preference))
}

/// Header carrying the change sequence of a write (responses) or the last one a client saw (search).
pub(crate) const CONSISTENCY_TOKEN: &str = "x-consistency-token";

pub(crate) fn consistency_token(headers: &HeaderMap) -> FhirResult<Option<u64>> {
    let Some(value) = headers.get(CONSISTENCY_TOKEN) else { return Ok(None) };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| FhirError::invalid("X-Consistency-Token must be the number a write response returned"))
}

/// `If-None-Exist` (conditional create).
pub(crate) fn if_none_exist(headers: &HeaderMap) -> FhirResult<Option<String>> {
    headers
        .get("if-none-exist")
        .map(|v| v.to_str().map(str::to_owned).map_err(|_| FhirError::invalid("If-None-Exist header is not ASCII")))
        .transpose()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn accept_json_variants_and_wildcards_but_not_xml() {
        for ok in
            ["application/fhir+json", "application/json", "*/*", "text/html, */*;q=0.8", "application/fhir+json;q=1"]
        {
            assert!(check_accept(ok).is_ok(), "{ok}");
        }
        for bad in ["application/fhir+xml", "application/xml, text/xml"] {
            assert_eq!(check_accept(bad).map_err(|e| e.category), Err(ErrorCategory::NotAcceptable), "{bad}");
        }
    }

    #[test]
    fn format_parameter_overrides_accept() {
        let h = headers(&[("accept", "application/fhir+xml")]);
        let params = vec![("_format".to_owned(), "json".to_owned())];
        assert!(presentation(&h, &params).is_ok());
        let params = vec![("_format".to_owned(), "xml".to_owned())];
        assert_eq!(
            presentation(&HeaderMap::new(), &params).map(|_| ()).map_err(|e| e.category),
            Err(ErrorCategory::NotAcceptable)
        );
    }

    #[test]
    fn if_match_accepts_weak_and_strong_etags_only() {
        assert_eq!(if_match(&headers(&[("if-match", "W/\"3\"")])).ok(), Some(Some(3)));
        assert_eq!(if_match(&headers(&[("if-match", "\"12\"")])).ok(), Some(Some(12)));
        assert!(if_match(&headers(&[("if-match", "3")])).is_err());
        assert!(if_match(&headers(&[("if-match", "W/\"x\"")])).is_err());
        assert_eq!(if_match(&HeaderMap::new()).ok(), Some(None));
    }

    #[test]
    fn prefer_return_is_read_from_any_prefer_header() {
        assert_eq!(prefer_return(&headers(&[("prefer", "return=minimal")])), Return::Minimal);
        assert_eq!(
            prefer_return(&headers(&[("prefer", "respond-async, return=OperationOutcome")])),
            Return::OperationOutcome
        );
        assert_eq!(prefer_return(&HeaderMap::new()), Return::Representation);
    }

    #[test]
    fn patch_format_follows_content_type() {
        assert!(matches!(
            patch_format(&headers(&[("content-type", "application/json-patch+json")])),
            Ok(PatchFormat::Json)
        ));
        assert!(matches!(
            patch_format(&headers(&[("content-type", "application/fhir+json; charset=utf-8")])),
            Ok(PatchFormat::FhirPath)
        ));
        assert!(patch_format(&headers(&[("content-type", "application/xml")])).is_err());
    }
}
