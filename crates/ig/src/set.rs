//! Installed packages put together: dependencies present, canonical URLs defined once.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::package::{Package, PackageError};

/// The packages a server runs with, resolved: every conformance resource by canonical URL.
#[derive(Debug, Clone, Default)]
pub struct IgSet {
    packages: Vec<Package>,
    /// Canonical URL → (index into `packages`, index into its resources).
    by_url: BTreeMap<String, (usize, usize)>,
}

impl IgSet {
    /// Puts `packages` together, or says everything that stops it: two versions of one package,
    /// a dependency not installed (other than the base specification, [`crate::CORE_PACKAGE`],
    /// which is built in), a canonical URL two packages define differently.
    pub fn resolve(mut packages: Vec<Package>) -> Result<IgSet, Vec<PackageError>> {
        packages.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        let mut errors = Vec::new();
        let mut versions: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for package in &packages {
            versions.entry(&package.name).or_default().push(&package.version);
        }
        for (name, found) in &versions {
            if found.len() > 1 {
                errors.push(PackageError::new(
                    *name,
                    format!("installed in {} versions ({}): keep one", found.len(), found.join(", ")),
                ));
            }
        }
        for package in &packages {
            for (dependency, wanted) in &package.dependencies {
                if dependency == crate::CORE_PACKAGE {
                    if !wanted.starts_with("4.0") {
                        errors.push(PackageError::new(
                            package.id(),
                            format!("depends on {dependency}#{wanted}, not the R4 core ({})", crate::FHIR_VERSION),
                        ));
                    }
                    continue;
                }
                match versions.get(dependency.as_str()) {
                    None => errors.push(PackageError::new(
                        package.id(),
                        format!("depends on {dependency}#{wanted}, which is not installed"),
                    )),
                    Some(found) if !found.iter().any(|v| satisfies(v, wanted)) => {
                        errors.push(PackageError::new(
                            package.id(),
                            format!(
                                "depends on {dependency}#{wanted}, but {dependency}#{} is installed",
                                found.join(", ")
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        let mut by_url: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (p, package) in packages.iter().enumerate() {
            for (r, (file, resource)) in package.resources.iter().enumerate() {
                let url = canonical(resource);
                match by_url.get(&url) {
                    // Packages often carry copies of what they depend on: the same content is fine.
                    Some(&(q, s)) if same_definition(&packages[q].resources[s].1, resource) => {}
                    Some(&(q, s)) => errors.push(PackageError::new(
                        package.id(),
                        format!(
                            "package/{file} defines {url}, which {} defines differently (package/{})",
                            packages[q].id(),
                            packages[q].resources[s].0
                        ),
                    )),
                    None => {
                        by_url.insert(url, (p, r));
                    }
                }
            }
        }
        if errors.is_empty() { Ok(IgSet { packages, by_url }) } else { Err(errors) }
    }

    /// The packages, by name.
    pub fn packages(&self) -> &[Package] {
        &self.packages
    }

    /// The conformance resource with canonical `url` (`url|version` asks for that version).
    pub fn resource(&self, url: &str) -> Option<&Value> {
        let found = self.by_url.get(url).or_else(|| {
            let (bare, _) = url.split_once('|')?;
            self.by_url.get(bare)
        })?;
        let &(p, r) = found;
        let resource = &self.packages[p].resources[r].1;
        match url.split_once('|') {
            Some((_, version)) if resource.get("version").and_then(Value::as_str) != Some(version) => None,
            _ => Some(resource),
        }
    }

    /// Every conformance resource of `resource_type`, in canonical-URL order.
    pub fn of_type<'a>(&'a self, resource_type: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.by_url
            .values()
            .map(|&(p, r)| &self.packages[p].resources[r].1)
            .filter(move |resource| resource["resourceType"] == resource_type)
    }
}

/// The key a resource is defined under: its `url`. (Two versions of one canonical in the same
/// set are a conflict: a server resolves a canonical to one definition.)
fn canonical(resource: &Value) -> String {
    resource["url"].as_str().unwrap_or_default().to_owned()
}

/// The same definition, whatever the narrative and metadata that tools regenerate.
fn same_definition(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(object) = v.as_object_mut() {
            for key in ["text", "meta", "date", "id"] {
                object.remove(key);
            }
        }
        v
    };
    strip(a) == strip(b)
}

/// Whether installed `version` satisfies the `wanted` one: equal, or `wanted` is a range npm
/// style packages use (`1.0.x`, `current`, `dev`, `latest`, `*`).
fn satisfies(version: &str, wanted: &str) -> bool {
    match wanted {
        "current" | "dev" | "latest" | "*" => true,
        _ => match wanted.strip_suffix(".x") {
            Some(prefix) => version.starts_with(&format!("{prefix}.")),
            None => version == wanted,
        },
    }
}
