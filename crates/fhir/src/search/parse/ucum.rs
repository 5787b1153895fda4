//! Canonical forms of UCUM quantities where the conversion is a pure scaling: metric prefixes on
//! g, m, L, s, mol, eq, Pa, U and K, a few non-metric units (min, h, d, wk, [lb_av], [oz_av],
//! [in_i], [ft_i], mm[Hg]) and one level of division (`mg/dL` → `g/L`). Anything else (affine
//! units like `Cel`, annotations, exponents, arbitrary units) has no canonical form and is compared
//! by its system and code as written.

/// The UCUM code system.
pub const UCUM_SYSTEM: &str = "http://unitsofmeasure.org";

/// `value` in UCUM unit `code`, converted to the canonical unit (value, canonical code); `None` when
/// the unit is not a pure scaling of a known base unit.
pub fn ucum_canonical(value: f64, code: &str) -> Option<(f64, String)> {
    let (factor, unit) = unit(code)?;
    let converted = value * factor;
    converted.is_finite().then_some((converted, unit))
}

fn unit(code: &str) -> Option<(f64, String)> {
    match code.split_once('/') {
        Some((numerator, denominator)) => {
            let (top, top_unit) = atom(numerator)?;
            let (bottom, bottom_unit) = atom(denominator)?;
            Some((top / bottom, format!("{top_unit}/{bottom_unit}")))
        }
        None => atom(code),
    }
}

/// Units that take metric prefixes, with their canonical code.
const METRIC: [(&str, &str); 10] = [
    ("g", "g"),
    ("m", "m"),
    ("L", "L"),
    ("l", "L"),
    ("s", "s"),
    ("mol", "mol"),
    ("eq", "eq"),
    ("Pa", "Pa"),
    ("U", "U"),
    ("K", "K"),
];

/// Units without prefixes: (code, factor, canonical code).
const NON_METRIC: [(&str, f64, &str); 9] = [
    ("min", 60.0, "s"),
    ("h", 3600.0, "s"),
    ("d", 86_400.0, "s"),
    ("wk", 604_800.0, "s"),
    ("[lb_av]", 453.592_37, "g"),
    ("[oz_av]", 28.349_523_125, "g"),
    ("[in_i]", 0.0254, "m"),
    ("[ft_i]", 0.3048, "m"),
    ("mm[Hg]", 133.322_387_415, "Pa"),
];

const PREFIXES: [(&str, f64); 20] = [
    ("da", 1e1),
    ("Y", 1e24),
    ("Z", 1e21),
    ("E", 1e18),
    ("P", 1e15),
    ("T", 1e12),
    ("G", 1e9),
    ("M", 1e6),
    ("k", 1e3),
    ("h", 1e2),
    ("d", 1e-1),
    ("c", 1e-2),
    ("m", 1e-3),
    ("u", 1e-6),
    ("n", 1e-9),
    ("p", 1e-12),
    ("f", 1e-15),
    ("a", 1e-18),
    ("z", 1e-21),
    ("y", 1e-24),
];

fn atom(code: &str) -> Option<(f64, String)> {
    if let Some((_, canonical)) = METRIC.iter().find(|(c, _)| *c == code) {
        return Some((1.0, (*canonical).to_owned()));
    }
    if let Some((_, factor, canonical)) = NON_METRIC.iter().find(|(c, _, _)| *c == code) {
        return Some((*factor, (*canonical).to_owned()));
    }
    PREFIXES.iter().find_map(|(prefix, factor)| {
        let base = code.strip_prefix(prefix)?;
        let (_, canonical) = METRIC.iter().find(|(c, _)| *c == base)?;
        Some((*factor, (*canonical).to_owned()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: Option<(f64, String)>, value: f64, code: &str) {
        let (v, c) = actual.unwrap_or_else(|| panic!("expected a canonical form for {code}"));
        assert!((v - value).abs() <= value.abs() * 1e-9, "{v} != {value}");
        assert_eq!(c, code);
    }

    #[test]
    fn scales_prefixed_and_compound_units() {
        close(ucum_canonical(5.0, "mg"), 0.005, "g");
        close(ucum_canonical(2.0, "kg"), 2000.0, "g");
        close(ucum_canonical(3.0, "dL"), 0.3, "L");
        close(ucum_canonical(100.0, "mg/dL"), 1.0, "g/L");
        close(ucum_canonical(4.0, "mmol/L"), 0.004, "mol/L");
        close(ucum_canonical(2.0, "h"), 7200.0, "s");
        close(ucum_canonical(1.0, "m"), 1.0, "m");
        close(ucum_canonical(1.0, "dam"), 10.0, "m");
        close(ucum_canonical(120.0, "mm[Hg]"), 15_998.686_489_8, "Pa");
    }

    #[test]
    fn no_canonical_form_for_other_units() {
        for code in ["Cel", "[degF]", "%", "10*3/uL", "mg/kg/d", "", "kg.m", "{beats}/min", "xyz"] {
            assert_eq!(ucum_canonical(1.0, code), None, "{code}");
        }
    }
}
