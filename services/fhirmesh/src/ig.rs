//! `fhirmesh ig install|list|remove`: the Implementation Guide packages a server loads at start,
//! kept as `{name}#{version}.tgz` files in [`Config::ig_dir`]. Every change is checked against
//! what stays installed (dependencies present, canonical URLs defined once) before a file moves.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fhirmesh_ig::{IgSet, Package, PackageError};

use crate::Config;

/// An installed package and the file it is kept in.
struct Installed {
    file: PathBuf,
    package: Package,
}

/// The packages in `dir` (none when it does not exist), each read and checked.
fn installed(dir: &Path) -> anyhow::Result<Vec<Installed>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(error) => return Err(error).with_context(|| format!("cannot read the IG directory {}", dir.display())),
    };
    let mut errors = Vec::new();
    for entry in entries {
        let file = entry.with_context(|| format!("cannot read the IG directory {}", dir.display()))?.path();
        if file.extension().and_then(|e| e.to_str()) != Some("tgz") {
            continue;
        }
        match read(&file) {
            Ok(package) => found.push(Installed { file, package }),
            Err(error) => errors.push(error),
        }
    }
    if !errors.is_empty() {
        bail!(report("installed IG packages cannot be read", &errors));
    }
    found.sort_by_key(|i| i.package.id());
    Ok(found)
}

fn read(file: &Path) -> Result<Package, PackageError> {
    let origin = file.display().to_string();
    let bytes = std::fs::read(file).map_err(|e| PackageError { package: origin.clone(), message: e.to_string() })?;
    Package::from_tgz(&origin, &bytes)
}

fn report(what: &str, errors: &[PackageError]) -> String {
    let lines: Vec<String> = errors.iter().map(|e| format!("  - {e}")).collect();
    format!("{what}:\n{}", lines.join("\n"))
}

fn resolve(packages: Vec<Package>, what: &str) -> anyhow::Result<IgSet> {
    IgSet::resolve(packages).map_err(|errors| anyhow::anyhow!(report(what, &errors)))
}

/// The installed packages, resolved, with their search parameters installed in the registry
/// (searchable, extracted on writes and by `fhirmesh reindex`, listed in the CapabilityStatement):
/// what a server starts with. A package that cannot be read, a set that does not resolve, or a
/// search parameter that cannot work stops the start with every reason.
pub fn load(config: &Config) -> anyhow::Result<IgSet> {
    let set = read_set(config)?;
    let mut definitions = Vec::new();
    let mut errors = Vec::new();
    for resource in set.of_type("SearchParameter") {
        if resource["status"] == "retired" {
            continue;
        }
        match serde_json::from_value::<fhirmesh_fhir::search::SearchParamDef>(resource.clone()) {
            Ok(definition) => definitions.push(definition),
            Err(error) => errors.push(format!("{}: not a usable SearchParameter: {error}", resource["url"])),
        }
    }
    if !definitions.is_empty() && errors.is_empty() {
        let count = definitions.len();
        match fhirmesh_fhir::search::params::install_extensions(definitions) {
            Ok(()) => tracing::info!(count, "IG search parameters installed"),
            Err(reasons) => errors.extend(reasons),
        }
    }
    if !errors.is_empty() {
        let lines: Vec<String> = errors.iter().map(|e| format!("  - {e}")).collect();
        bail!("the IG packages' search parameters cannot be used:\n{}", lines.join("\n"));
    }
    Ok(set)
}

/// The installed packages, resolved and reported.
fn read_set(config: &Config) -> anyhow::Result<IgSet> {
    let dir = config.ig_dir();
    let set = resolve(
        installed(&dir)?.into_iter().map(|i| i.package).collect(),
        &format!("the IG packages in {} do not fit together", dir.display()),
    )?;
    for package in set.packages() {
        tracing::info!(
            package = %package.id(),
            conformance_resources = package.resources.len(),
            examples = package.examples.len(),
            "IG package loaded"
        );
    }
    Ok(set)
}

/// Installs the packages in `files` (a package already installed under the same name is
/// replaced: an upgrade or a downgrade), if what results resolves.
pub fn install(config: &Config, files: &[PathBuf]) -> anyhow::Result<()> {
    let dir = config.ig_dir();
    let mut new = Vec::new();
    let errors: Vec<PackageError> = files
        .iter()
        .filter_map(|file| match read(file) {
            Ok(package) => {
                new.push((file.clone(), package));
                None
            }
            Err(error) => Some(error),
        })
        .collect();
    if !errors.is_empty() {
        bail!(report("nothing installed: these packages cannot be used", &errors));
    }
    let current = installed(&dir)?;
    let replaced: Vec<&Installed> =
        current.iter().filter(|i| new.iter().any(|(_, p)| p.name == i.package.name)).collect();
    let mut after: Vec<Package> = current
        .iter()
        .filter(|i| !new.iter().any(|(_, p)| p.name == i.package.name))
        .map(|i| i.package.clone())
        .collect();
    after.extend(new.iter().map(|(_, p)| p.clone()));
    resolve(after, "nothing installed: the packages would not fit together")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (file, package) in &new {
        let target = dir.join(format!("{}.tgz", package.id()));
        // Copied beside its place, then renamed: a reader never sees half a package.
        let partial = dir.join(format!(".{}.tgz.partial", package.id()));
        std::fs::copy(file, &partial)
            .with_context(|| format!("cannot copy {} to {}", file.display(), dir.display()))?;
        std::fs::rename(&partial, &target).with_context(|| format!("cannot install {}", target.display()))?;
        println!(
            "installed {} ({} conformance resources, {} examples)",
            package.id(),
            package.resources.len(),
            package.examples.len()
        );
    }
    for old in replaced {
        let id = old.package.id();
        if !new.iter().any(|(_, p)| p.id() == id) {
            std::fs::remove_file(&old.file).with_context(|| format!("cannot remove {}", old.file.display()))?;
            println!("removed {id} (replaced)");
        }
    }
    Ok(())
}

/// Prints the installed packages.
pub fn list(config: &Config) -> anyhow::Result<()> {
    let dir = config.ig_dir();
    let current = installed(&dir)?;
    if current.is_empty() {
        println!("no IG packages installed in {}", dir.display());
    }
    for Installed { package, .. } in &current {
        let deps: Vec<String> = package.dependencies.iter().map(|(n, v)| format!("{n}#{v}")).collect();
        println!(
            "{}  FHIR {}  {} conformance resources, {} examples{}",
            package.id(),
            package.fhir_versions.join(", "),
            package.resources.len(),
            package.examples.len(),
            if deps.is_empty() { String::new() } else { format!("  depends on {}", deps.join(", ")) }
        );
    }
    Ok(())
}

/// Removes the packages named (`name` or `name#version`), unless others installed need them.
pub fn remove(config: &Config, names: &[String]) -> anyhow::Result<()> {
    let dir = config.ig_dir();
    let current = installed(&dir)?;
    let named = |i: &Installed| names.iter().any(|n| *n == i.package.name || *n == i.package.id());
    for name in names {
        if !current.iter().any(|i| i.package.name == *name || i.package.id() == *name) {
            bail!("{name} is not installed in {}", dir.display());
        }
    }
    let kept: Vec<Package> = current.iter().filter(|i| !named(i)).map(|i| i.package.clone()).collect();
    resolve(kept, "nothing removed: what stays installed would not fit together")?;
    for gone in current.iter().filter(|i| named(i)) {
        std::fs::remove_file(&gone.file).with_context(|| format!("cannot remove {}", gone.file.display()))?;
        println!("removed {}", gone.package.id());
    }
    Ok(())
}

/// The profiles of the loaded packages, ready to validate against (`None`: the packages define
/// none). Definitions that cannot be validated against are reported and left out.
pub fn profiles(set: &IgSet) -> Option<std::sync::Arc<fhirmesh_ig::Validator>> {
    set.of_type("StructureDefinition").next()?;
    let validator = fhirmesh_ig::Validator::new(set);
    for (url, why) in validator.unusable() {
        tracing::warn!(profile = %url, reason = %why, "IG profile not validated against");
    }
    Some(std::sync::Arc::new(validator))
}

/// What every write passes after schema validation: the Subscription rules, then the profiles
/// the resource claims in `meta.profile` (their errors refuse it with 422; their warnings, such
/// as a claimed profile that is not loaded, let it through).
#[derive(Debug)]
pub struct WriteRules {
    subscriptions: fhirmesh_notify::SubscriptionWriteRules,
    profiles: Option<std::sync::Arc<fhirmesh_ig::Validator>>,
}

impl WriteRules {
    pub fn new(
        subscriptions: fhirmesh_notify::SubscriptionWriteRules,
        profiles: Option<std::sync::Arc<fhirmesh_ig::Validator>>,
    ) -> WriteRules {
        WriteRules { subscriptions, profiles }
    }
}

impl fhirmesh_core::ports::WriteRules for WriteRules {
    fn check(
        &self,
        resource_type: fhirmesh_fhir::ResourceType,
        resource: &serde_json::Value,
    ) -> Result<(), fhirmesh_core::error::FhirError> {
        self.subscriptions.check(resource_type, resource)?;
        let Some(profiles) = &self.profiles else { return Ok(()) };
        let errors: Vec<fhirmesh_fhir::outcome::Issue> = profiles
            .validate(resource)
            .into_iter()
            .filter(|issue| issue.severity == fhirmesh_fhir::outcome::Severity::Error)
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(fhirmesh_core::error::FhirError::with_issues(
                fhirmesh_core::error::ErrorCategory::Unprocessable,
                errors,
            ))
        }
    }

    fn validate(
        &self,
        resource_type: fhirmesh_fhir::ResourceType,
        resource: &serde_json::Value,
        profile: Option<&str>,
    ) -> Vec<fhirmesh_fhir::outcome::Issue> {
        let mut issues = match self.subscriptions.check(resource_type, resource) {
            Ok(()) => Vec::new(),
            Err(error) => error.issues,
        };
        let Some(profiles) = &self.profiles else {
            issues.extend(profile.map(fhirmesh_core::ports::unknown_profile));
            return issues;
        };
        issues.extend(profiles.validate(resource));
        let claimed = |url: &str| resource["meta"]["profile"].as_array().is_some_and(|c| c.iter().any(|p| p == url));
        if let Some(url) = profile.filter(|url| !claimed(url)) {
            match profiles.validate_against(resource, url) {
                Ok(found) => issues.extend(found),
                Err(_) => issues.push(fhirmesh_core::ports::unknown_profile(url)),
            }
        }
        issues
    }

    fn tenant_limit(
        &self,
        resource_type: fhirmesh_fhir::ResourceType,
        resource: &serde_json::Value,
        now: time::OffsetDateTime,
    ) -> Option<fhirmesh_core::ports::TenantLimit> {
        self.subscriptions.tenant_limit(resource_type, resource, now)
    }

    fn check_limit(
        &self,
        resource_type: fhirmesh_fhir::ResourceType,
        others: usize,
        limit: &fhirmesh_core::ports::TenantLimit,
    ) -> Result<(), fhirmesh_core::error::FhirError> {
        self.subscriptions.check_limit(resource_type, others, limit)
    }
}
