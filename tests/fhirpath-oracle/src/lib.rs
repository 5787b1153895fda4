//! Test-only package: `tests/oracle/main.rs` evaluates every base R4 search parameter's FHIRPath expression
//! with the `octofhir-fhirpath` engine over every spec example and compares the values with what
//! `fhirmesh_fhir::search::extract` extracts. Nothing here is used at run time.
