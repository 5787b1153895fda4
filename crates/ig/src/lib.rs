//! Implementation Guide packages in the FHIR NPM package format
//! (<https://confluence.hl7.org/display/FHIR/NPM+Package+Specification>): a gzipped tarball with
//! `package/package.json` (name, version, FHIR versions, dependencies) and the guide's resources
//! as JSON files under `package/` (examples under `package/example/`).
//!
//! [`Package::from_tgz`] reads and checks one package; [`IgSet::resolve`] puts installed packages
//! together — every dependency present, every canonical URL defined once — into the conformance
//! resources the server extends itself with (search parameters, profiles, value sets, …), and
//! [`Validator`] checks resources against the profiles among them. Pure:
//! the bytes come from wherever the caller keeps packages (a directory, a blob store).

mod package;
pub mod profile;
mod set;
pub mod terminology;

pub use package::{CONFORMANCE_TYPES, Package, PackageError};
pub use profile::Validator;
pub use set::IgSet;

/// The FHIR version this server implements; a package must declare a 4.0.x version.
pub const FHIR_VERSION: &str = "4.0.1";

/// The base specification's package: built in, never installed.
pub const CORE_PACKAGE: &str = "hl7.fhir.r4.core";

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;
