//! The seeded synthetic data set: a directory of Organizations and Practitioners, and one
//! transaction Bundle per patient (Patient, Encounters, Observations, Conditions,
//! MedicationRequests) that refers to it.
//!
//! Everything is a pure function of `(seed, index)`: each patient (and each directory member) has
//! its own random stream derived from the seed and its index, so bundles can be generated in any
//! order, on any thread, one at a time, and come out byte for byte the same. Dates are relative to
//! a fixed reference day ([`REFERENCE_DATE`]), never the wall clock. Codes are real (LOINC, SNOMED
//! CT, RxNorm, UCUM, HL7 code systems); names and addresses come from small tables, so family names
//! repeat across patients and string searches find several.

use fastrand::Rng;
use serde_json::{Value, json};
use time::macros::date;
use time::{Date, Duration, PrimitiveDateTime};

/// Identifier system of synthetic Patients; the value is `{seed}-{index}`.
pub const SYNTHETIC_IDENTIFIER_SYSTEM: &str = "urn:fhirmesh:synthetic";
/// Identifier system of the synthetic Patients' medical record numbers.
pub const SYNTHETIC_MRN_SYSTEM: &str = "urn:fhirmesh:synthetic:mrn";
/// Organizations in the directory: `Organization/synth-org-0` … `synth-org-19`.
pub const ORGANIZATIONS: usize = 20;
/// Practitioners in the directory: `Practitioner/synth-pr-0` … `synth-pr-49`.
pub const PRACTITIONERS: usize = 50;
/// "Today" for the data set: ages, encounter dates and onsets are counted back from this day.
pub const REFERENCE_DATE: Date = date!(2025 - 06 - 30);

const NPI: &str = "http://hl7.org/fhir/sid/us-npi";
const LOINC: &str = "http://loinc.org";
const SNOMED: &str = "http://snomed.info/sct";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const UCUM: &str = "http://unitsofmeasure.org";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const PARTICIPATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const CONDITION_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
const CONDITION_VERIFICATION: &str = "http://terminology.hl7.org/CodeSystem/condition-ver-status";
const CONDITION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/condition-category";
const MARITAL_STATUS: &str = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus";
const IDENTIFIER_TYPE: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
const ORGANIZATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/organization-type";
const DEGREE: &str = "http://terminology.hl7.org/CodeSystem/v2-0360|2.7";

// Random streams: each kind of generated thing has its own, so adding one never shifts another.
const PATIENT_STREAM: u64 = 1;
const ORGANIZATION_STREAM: u64 = 2;
const PRACTITIONER_STREAM: u64 = 3;

const FAMILIES: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Müller",
    "Peña",
];
const FEMALE_GIVEN: &[&str] = &[
    "Mary",
    "Patricia",
    "Jennifer",
    "Linda",
    "Elizabeth",
    "Barbara",
    "Susan",
    "Jessica",
    "Sarah",
    "Karen",
    "Lisa",
    "Nancy",
    "Betty",
    "Sandra",
    "Margaret",
    "Ashley",
    "Emily",
    "Olivia",
    "Emma",
    "Sophia",
    "Ava",
    "Mia",
    "Chloé",
    "Zoë",
];
const MALE_GIVEN: &[&str] = &[
    "James",
    "Robert",
    "John",
    "Michael",
    "David",
    "William",
    "Richard",
    "Joseph",
    "Thomas",
    "Charles",
    "Christopher",
    "Daniel",
    "Matthew",
    "Anthony",
    "Mark",
    "Steven",
    "Paul",
    "Andrew",
    "Joshua",
    "Kevin",
    "Brian",
    "Liam",
    "Noah",
    "José",
];
/// City, state, first three digits of its ZIP codes, telephone area code.
type City = (&'static str, &'static str, &'static str, &'static str);
const CITIES: &[City] = &[
    ("Boston", "MA", "021", "617"),
    ("Springfield", "MA", "011", "413"),
    ("Worcester", "MA", "016", "508"),
    ("Cambridge", "MA", "021", "617"),
    ("Lowell", "MA", "018", "978"),
    ("Providence", "RI", "029", "401"),
    ("Hartford", "CT", "061", "860"),
    ("New Haven", "CT", "065", "203"),
    ("Burlington", "VT", "054", "802"),
    ("Portland", "ME", "041", "207"),
    ("Manchester", "NH", "031", "603"),
    ("Albany", "NY", "122", "518"),
];
const STREETS: &[&str] =
    &["Main", "Oak", "Maple", "Cedar", "Elm", "Washington", "Lake", "Hill", "Park", "Pine", "Church", "Highland"];
const STREET_KINDS: &[&str] = &["Street", "Avenue", "Road", "Lane", "Drive", "Court"];
const ORGANIZATION_KINDS: &[&str] = &[
    "General Hospital",
    "Medical Center",
    "Family Practice",
    "Community Health Center",
    "Urgent Care",
    "Pediatrics",
    "Cardiology Associates",
];

/// A measured quantity: LOINC code and display, UCUM unit (display, code), and the range of
/// values drawn, in units of `1/scale` (so `scale` 10 gives one decimal).
struct Measure {
    code: &'static str,
    display: &'static str,
    unit: &'static str,
    ucum: &'static str,
    low: i64,
    high: i64,
    scale: i64,
}

const fn measure(
    code: &'static str,
    display: &'static str,
    unit: &'static str,
    ucum: &'static str,
    (low, high, scale): (i64, i64, i64),
) -> Measure {
    Measure { code, display, unit, ucum, low, high, scale }
}

const HEART_RATE: Measure = measure("8867-4", "Heart rate", "beats/minute", "/min", (52, 110, 1));
const RESPIRATORY_RATE: Measure = measure("9279-1", "Respiratory rate", "breaths/minute", "/min", (12, 22, 1));
const BODY_TEMPERATURE: Measure = measure("8310-5", "Body temperature", "°C", "Cel", (361, 383, 10));
const OXYGEN_SATURATION: Measure = measure("2708-6", "Oxygen saturation in Arterial blood", "%", "%", (92, 100, 1));
const BMI: Measure = measure("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", "kg/m2", (175, 380, 10));
const ADULT_WEIGHT: Measure = measure("29463-7", "Body weight", "kg", "kg", (480, 1250, 10));
const CHILD_WEIGHT: Measure = measure("29463-7", "Body weight", "kg", "kg", (35, 450, 10));
const ADULT_HEIGHT: Measure = measure("8302-2", "Body height", "cm", "cm", (1500, 1960, 10));
const CHILD_HEIGHT: Measure = measure("8302-2", "Body height", "cm", "cm", (500, 1550, 10));
const SYSTOLIC: Measure = measure("8480-6", "Systolic blood pressure", "mmHg", "mm[Hg]", (100, 165, 1));
const DIASTOLIC: Measure = measure("8462-4", "Diastolic blood pressure", "mmHg", "mm[Hg]", (60, 100, 1));
const BLOOD_PRESSURE_PANEL: (&str, &str) = ("85354-9", "Blood pressure panel with all children optional");

const LABS: &[Measure] = &[
    measure("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", "mg/dL", (68, 190, 1)),
    measure("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", "mg/dL", (140, 290, 1)),
    measure("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", "mg/dL", (30, 95, 1)),
    measure(
        "18262-6",
        "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay",
        "mg/dL",
        "mg/dL",
        (55, 195, 1),
    ),
    measure("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", "mg/dL", (45, 320, 1)),
    measure("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", "%", (45, 105, 10)),
    measure("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", "g/dL", (105, 175, 10)),
    measure("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", "mg/dL", (50, 160, 100)),
    measure("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", "mmol/L", (133, 147, 1)),
    measure("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", "mmol/L", (33, 53, 10)),
    measure("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", "10*3/uL", (35, 120, 10)),
    measure("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", "10*3/uL", (140, 420, 1)),
];

/// SNOMED CT code, display, chronic (active, on the problem list) or acute (resolved, an
/// encounter diagnosis).
const CONDITIONS: &[(&str, &str, bool)] = &[
    ("44054006", "Diabetes mellitus type 2 (disorder)", true),
    ("38341003", "Hypertensive disorder, systemic arterial (disorder)", true),
    ("55822004", "Hyperlipidemia (disorder)", true),
    ("195967001", "Asthma (disorder)", true),
    ("13645005", "Chronic obstructive pulmonary disease (disorder)", true),
    ("35489007", "Depressive disorder (disorder)", true),
    ("197480006", "Anxiety disorder (disorder)", true),
    ("49436004", "Atrial fibrillation (disorder)", true),
    ("239873007", "Osteoarthritis of knee (disorder)", true),
    ("73430006", "Sleep apnea (disorder)", true),
    ("162864005", "Body mass index 30+ - obesity (finding)", true),
    ("444814009", "Viral sinusitis (disorder)", false),
    ("10509002", "Acute bronchitis (disorder)", false),
    ("68566005", "Urinary tract infectious disease (disorder)", false),
    ("43878008", "Streptococcal sore throat (disorder)", false),
    ("65363002", "Otitis media (disorder)", false),
];

/// A dose form: display, UCUM annotation.
type DoseForm = (&'static str, &'static str);
const TABLET: DoseForm = ("tablet", "{tbl}");
const CAPSULE: DoseForm = ("capsule", "{cap}");
const PUFF: DoseForm = ("puff", "{puff}");
/// RxNorm code, display, dose form, route, doses a day.
type Medication = (&'static str, &'static str, DoseForm, &'static str, u32);
const MEDICATIONS: &[Medication] = &[
    ("314076", "lisinopril 10 MG Oral Tablet", TABLET, "by mouth", 1),
    ("197361", "amlodipine 5 MG Oral Tablet", TABLET, "by mouth", 1),
    ("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet", TABLET, "by mouth", 2),
    ("259255", "atorvastatin 80 MG Oral Tablet", TABLET, "by mouth", 1),
    ("310798", "hydrochlorothiazide 25 MG Oral Tablet", TABLET, "by mouth", 1),
    ("312961", "simvastatin 20 MG Oral Tablet", TABLET, "by mouth", 1),
    ("855332", "warfarin sodium 5 MG Oral Tablet", TABLET, "by mouth", 1),
    ("312938", "sertraline 100 MG Oral Tablet", TABLET, "by mouth", 1),
    ("313782", "acetaminophen 325 MG Oral Tablet", TABLET, "by mouth", 3),
    ("310965", "ibuprofen 200 MG Oral Tablet", TABLET, "by mouth", 3),
    ("849574", "naproxen sodium 220 MG Oral Tablet", TABLET, "by mouth", 2),
    ("308182", "amoxicillin 250 MG Oral Capsule", CAPSULE, "by mouth", 3),
    ("745679", "200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler", PUFF, "inhaled", 4),
    ("895994", "120 ACTUAT fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler", PUFF, "inhaled", 2),
];

/// SplitMix64's finaliser: spreads `(seed, stream, index)` over the whole seed space.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn rng_for(seed: u64, stream: u64, index: u64) -> Rng {
    Rng::with_seed(mix(mix(mix(seed) ^ stream) ^ index))
}

/// An element of a table (non-empty by construction).
fn pick<'a, T>(rng: &mut Rng, table: &'a [T]) -> &'a T {
    &table[rng.u32(..table.len() as u32) as usize]
}

/// `count` distinct indices below `len`, in drawn order (a partial Fisher–Yates shuffle).
fn distinct(rng: &mut Rng, len: usize, count: usize) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..len).collect();
    let count = count.min(len);
    for i in 0..count {
        let j = i + rng.u32(..(len - i) as u32) as usize;
        indices.swap(i, j);
    }
    indices.truncate(count);
    indices
}

/// `urn:uuid:…`, a version-4 UUID drawn from `rng`.
fn urn_uuid(rng: &mut Rng) -> String {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes);
    format!("urn:uuid:{}", uuid::Builder::from_random_bytes(bytes).into_uuid())
}

fn format_date(date: Date) -> String {
    format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day())
}

/// A FHIR `dateTime` with seconds, in UTC.
fn format_date_time(at: PrimitiveDateTime) -> String {
    format!("{}T{:02}:{:02}:{:02}Z", format_date(at.date()), at.hour(), at.minute(), at.second())
}

fn reference(target: String) -> Value {
    json!({ "reference": target })
}

fn organization_ref(index: usize) -> String {
    format!("Organization/synth-org-{index}")
}

fn practitioner_ref(index: usize) -> String {
    format!("Practitioner/synth-pr-{index}")
}

fn npi(rng: &mut Rng) -> String {
    format!("1{:09}", rng.u32(..1_000_000_000))
}

fn phone(rng: &mut Rng, city: &City) -> String {
    // 555-01xx numbers are reserved for fiction.
    format!("({}) 555-01{:02}", city.3, rng.u32(..100))
}

fn address(rng: &mut Rng, city: &City, kind: &str) -> Value {
    let line = format!("{} {} {}", rng.u32(1..2000), pick(rng, STREETS), pick(rng, STREET_KINDS));
    json!({
        "use": kind,
        "line": [line],
        "city": city.0,
        "state": city.1,
        "postalCode": format!("{}{:02}", city.2, rng.u32(..100)),
        "country": "US"
    })
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({ "system": system, "code": code, "display": display })
}

fn concept(system: &str, code: &str, display: &str) -> Value {
    json!({ "coding": [coding(system, code, display)], "text": display })
}

// ---------------------------------------------------------------------------------------------
// The directory

/// A directory Practitioner's name: (given, family, gender).
struct PractitionerName {
    given: &'static str,
    family: &'static str,
    gender: &'static str,
}

fn practitioner_name(rng: &mut Rng) -> PractitionerName {
    let gender = if rng.bool() { "female" } else { "male" };
    let given = *pick(rng, if gender == "female" { FEMALE_GIVEN } else { MALE_GIVEN });
    let family = *pick(rng, FAMILIES);
    PractitionerName { given, family, gender }
}

/// The display of `Practitioner/synth-pr-{index}` (`Dr. Given Family`), for references.
fn practitioner_display(seed: u64, index: usize) -> String {
    let name = practitioner_name(&mut rng_for(seed, PRACTITIONER_STREAM, index as u64));
    format!("Dr. {} {}", name.given, name.family)
}

fn organization_name(rng: &mut Rng) -> (String, &'static City) {
    let city = pick(rng, CITIES);
    (format!("{} {}", city.0, pick(rng, ORGANIZATION_KINDS)), city)
}

/// The display of `Organization/synth-org-{index}`, for references.
fn organization_display(seed: u64, index: usize) -> String {
    organization_name(&mut rng_for(seed, ORGANIZATION_STREAM, index as u64)).0
}

fn organization(seed: u64, index: usize) -> Value {
    let mut rng = rng_for(seed, ORGANIZATION_STREAM, index as u64);
    let (name, city) = organization_name(&mut rng);
    let telecom = phone(&mut rng, city);
    json!({
        "resourceType": "Organization",
        "id": format!("synth-org-{index}"),
        "identifier": [{ "system": NPI, "value": npi(&mut rng) }],
        "active": true,
        "type": [concept(ORGANIZATION_TYPE, "prov", "Healthcare Provider")],
        "name": name,
        "telecom": [{ "system": "phone", "value": telecom, "use": "work" }],
        "address": [address(&mut rng, city, "work")]
    })
}

fn practitioner(seed: u64, index: usize) -> Value {
    let mut rng = rng_for(seed, PRACTITIONER_STREAM, index as u64);
    let name = practitioner_name(&mut rng);
    let email = format!("{}.{}{index}@example.org", name.given.to_lowercase(), name.family.to_lowercase());
    json!({
        "resourceType": "Practitioner",
        "id": format!("synth-pr-{index}"),
        "identifier": [{ "system": NPI, "value": npi(&mut rng) }],
        "active": true,
        "name": [{ "use": "official", "family": name.family, "given": [name.given], "prefix": ["Dr."] }],
        "telecom": [{ "system": "email", "value": email, "use": "work" }],
        "gender": name.gender,
        "qualification": [{ "code": concept(DEGREE, "MD", "Doctor of Medicine") }]
    })
}

/// The shared Organizations and Practitioners as a transaction Bundle of `PUT`s with stable ids
/// (`Organization/synth-org-N`, `Practitioner/synth-pr-N`): load it once, before the patients.
pub fn synthetic_directory(seed: u64) -> Value {
    let organizations = (0..ORGANIZATIONS).map(|i| (format!("Organization/synth-org-{i}"), organization(seed, i)));
    let practitioners = (0..PRACTITIONERS).map(|i| (format!("Practitioner/synth-pr-{i}"), practitioner(seed, i)));
    let entry: Vec<Value> = organizations
        .chain(practitioners)
        .map(|(url, resource)| json!({ "resource": resource, "request": { "method": "PUT", "url": url } }))
        .collect();
    json!({ "resourceType": "Bundle", "type": "transaction", "entry": entry })
}

// ---------------------------------------------------------------------------------------------
// Patients

/// How many of each resource a patient has: the first draws of its random stream, so the size of
/// a bundle is known without generating it.
struct Counts {
    encounters: usize,
    observations: usize,
    conditions: usize,
    medications: usize,
}

impl Counts {
    fn draw(rng: &mut Rng) -> Counts {
        Counts {
            encounters: rng.u32(2..=6) as usize,
            observations: rng.u32(5..=25) as usize,
            conditions: rng.u32(1..=5) as usize,
            medications: rng.u32(1..=5) as usize,
        }
    }

    fn entries(&self) -> usize {
        1 + self.encounters + self.observations + self.conditions + self.medications
    }
}

/// The number of entries (resources) in [`synthetic_patient_bundle`]`(seed, index)`, without
/// generating it (for progress totals).
pub fn synthetic_patient_entries(seed: u64, index: usize) -> usize {
    Counts::draw(&mut rng_for(seed, PATIENT_STREAM, index as u64)).entries()
}

/// An encounter as the resources that refer to it need it.
struct EncounterFacts {
    full_url: String,
    start: PrimitiveDateTime,
    minutes: i64,
    practitioner: usize,
}

fn entry(full_url: String, resource: Value) -> Value {
    let url = resource["resourceType"].clone();
    json!({ "fullUrl": full_url, "resource": resource, "request": { "method": "POST", "url": url } })
}

/// A `valueQuantity` drawn from `measure`'s range.
fn quantity(rng: &mut Rng, measure: &Measure) -> Value {
    let raw = rng.i64(measure.low..=measure.high);
    let value = if measure.scale == 1 { json!(raw) } else { json!(raw as f64 / measure.scale as f64) };
    json!({ "value": value, "unit": measure.unit, "system": UCUM, "code": measure.ucum })
}

fn loinc(code: &str, display: &str) -> Value {
    concept(LOINC, code, display)
}

/// The deterministic transaction Bundle of synthetic patient `index`: `POST`s with `urn:uuid:`
/// fullUrls of one Patient (identifier `urn:fhirmesh:synthetic|{seed}-{index}`), 2–6 Encounters,
/// 5–25 Observations, 1–5 Conditions and 1–5 MedicationRequests, referring to each other and to
/// the [`synthetic_directory`].
pub fn synthetic_patient_bundle(seed: u64, index: usize) -> Value {
    let mut rng = rng_for(seed, PATIENT_STREAM, index as u64);
    let counts = Counts::draw(&mut rng);
    let mut entries = Vec::with_capacity(counts.entries());

    // Patient
    let patient_url = urn_uuid(&mut rng);
    let female = rng.bool();
    let gender = match rng.u32(..100) {
        0 => "other",
        1 => "unknown",
        _ if female => "female",
        _ => "male",
    };
    let given_names = if female { FEMALE_GIVEN } else { MALE_GIVEN };
    let family = *pick(&mut rng, FAMILIES);
    let mut given = vec![*pick(&mut rng, given_names)];
    if rng.u32(..3) == 0 {
        given.push(*pick(&mut rng, given_names));
    }
    let age_days = rng.i64(30..=92 * 365);
    let birth = REFERENCE_DATE - Duration::days(age_days);
    let adult = age_days >= 18 * 365;
    let city = pick(&mut rng, CITIES);
    let home = address(&mut rng, city, "home");
    let telecom = phone(&mut rng, city);
    let gp = rng.u32(..PRACTITIONERS as u32) as usize;
    let organization = rng.u32(..ORGANIZATIONS as u32) as usize;
    let mrn = format!("MRN{:08}", rng.u32(..100_000_000));
    let mut patient = json!({
        "resourceType": "Patient",
        "identifier": [
            { "use": "usual", "system": SYNTHETIC_IDENTIFIER_SYSTEM, "value": format!("{seed}-{index}") },
            {
                "use": "official",
                "type": concept(IDENTIFIER_TYPE, "MR", "Medical record number"),
                "system": SYNTHETIC_MRN_SYSTEM,
                "value": mrn
            }
        ],
        "active": true,
        "name": [{ "use": "official", "family": family, "given": given }],
        "telecom": [{ "system": "phone", "value": telecom, "use": "home" }],
        "gender": gender,
        "birthDate": format_date(birth),
        "address": [home],
        "generalPractitioner": [{ "reference": practitioner_ref(gp), "display": practitioner_display(seed, gp) }],
        "managingOrganization": {
            "reference": organization_ref(organization),
            "display": organization_display(seed, organization)
        }
    });
    if adult {
        let (code, display) =
            *pick(&mut rng, &[("M", "Married"), ("S", "Never Married"), ("D", "Divorced"), ("W", "Widowed")]);
        patient["maritalStatus"] = concept(MARITAL_STATUS, code, display);
    }
    entries.push(entry(patient_url.clone(), patient));
    let subject = || reference(patient_url.clone());

    // Encounters, in date order, within the last five years of the patient's life.
    let window = age_days.min(5 * 365);
    let mut days: Vec<i64> = (0..counts.encounters).map(|_| rng.i64(0..=window)).collect();
    days.sort_unstable();
    let mut encounters = Vec::with_capacity(counts.encounters);
    for days_ago in days {
        let full_url = urn_uuid(&mut rng);
        let day = REFERENCE_DATE - Duration::days(days_ago);
        let start = day.midnight() + Duration::minutes(rng.i64(7 * 60..18 * 60));
        let (class, class_display, kind, minutes) = match rng.u32(..10) {
            0 => ("EMER", "emergency", ("50849002", "Emergency room admission (procedure)"), rng.i64(60..=360)),
            1 => ("IMP", "inpatient encounter", ("32485007", "Hospital admission (procedure)"), rng.i64(1..=6) * 1440),
            2..=5 => ("AMB", "ambulatory", ("185349003", "Encounter for check up (procedure)"), rng.i64(15..=45)),
            6..=7 => ("AMB", "ambulatory", ("185345009", "Encounter for symptom (procedure)"), rng.i64(15..=45)),
            _ => ("AMB", "ambulatory", ("390906007", "Follow-up encounter (procedure)"), rng.i64(10..=30)),
        };
        let practitioner = if rng.u32(..10) < 7 { gp } else { rng.u32(..PRACTITIONERS as u32) as usize };
        let provider = if class == "AMB" { organization } else { rng.u32(..ORGANIZATIONS as u32) as usize };
        let encounter = json!({
            "resourceType": "Encounter",
            "status": "finished",
            "class": { "system": ACT_CODE, "code": class, "display": class_display },
            "type": [concept(SNOMED, kind.0, kind.1)],
            "subject": subject(),
            "participant": [{
                "type": [concept(PARTICIPATION_TYPE, "PPRF", "primary performer")],
                "individual": {
                    "reference": practitioner_ref(practitioner),
                    "display": practitioner_display(seed, practitioner)
                }
            }],
            "period": {
                "start": format_date_time(start),
                "end": format_date_time(start + Duration::minutes(minutes))
            },
            "serviceProvider": {
                "reference": organization_ref(provider),
                "display": organization_display(seed, provider)
            }
        });
        entries.push(entry(full_url.clone(), encounter));
        encounters.push(EncounterFacts { full_url, start, minutes, practitioner });
    }

    // Observations: vital signs and labs, each during one of the encounters.
    for _ in 0..counts.observations {
        let encounter = pick(&mut rng, &encounters);
        let at = encounter.start + Duration::minutes(rng.i64(0..=encounter.minutes));
        let vital = rng.u32(..5) < 3;
        let mut observation = json!({
            "resourceType": "Observation",
            "status": "final",
            "category": [concept(
                OBSERVATION_CATEGORY,
                if vital { "vital-signs" } else { "laboratory" },
                if vital { "Vital Signs" } else { "Laboratory" },
            )],
            "code": null,
            "subject": subject(),
            "encounter": reference(encounter.full_url.clone()),
            "effectiveDateTime": format_date_time(at)
        });
        let measure = if vital {
            match rng.u32(..8) {
                0 => &HEART_RATE,
                1 => &RESPIRATORY_RATE,
                2 => &BODY_TEMPERATURE,
                3 => &OXYGEN_SATURATION,
                4 if adult => &BMI,
                4 => &HEART_RATE,
                5 if adult => &ADULT_WEIGHT,
                5 => &CHILD_WEIGHT,
                6 if adult => &ADULT_HEIGHT,
                6 => &CHILD_HEIGHT,
                _ => {
                    let (code, display) = BLOOD_PRESSURE_PANEL;
                    observation["code"] = loinc(code, display);
                    observation["component"] = json!([
                        { "code": loinc(SYSTOLIC.code, SYSTOLIC.display), "valueQuantity": quantity(&mut rng, &SYSTOLIC) },
                        { "code": loinc(DIASTOLIC.code, DIASTOLIC.display), "valueQuantity": quantity(&mut rng, &DIASTOLIC) }
                    ]);
                    entries.push(entry(urn_uuid(&mut rng), observation));
                    continue;
                }
            }
        } else {
            pick(&mut rng, LABS)
        };
        observation["code"] = loinc(measure.code, measure.display);
        observation["valueQuantity"] = quantity(&mut rng, measure);
        entries.push(entry(urn_uuid(&mut rng), observation));
    }

    // Conditions: distinct, each diagnosed at one of the encounters.
    for condition in distinct(&mut rng, CONDITIONS.len(), counts.conditions) {
        let (code, display, chronic) = CONDITIONS[condition];
        let encounter = pick(&mut rng, &encounters);
        let diagnosed = encounter.start.date();
        let mut resource = json!({
            "resourceType": "Condition",
            "clinicalStatus": null,
            "verificationStatus": concept(CONDITION_VERIFICATION, "confirmed", "Confirmed"),
            "category": null,
            "code": concept(SNOMED, code, display),
            "subject": subject(),
            "encounter": reference(encounter.full_url.clone()),
            "onsetDateTime": null,
            "recordedDate": format_date_time(encounter.start)
        });
        if chronic {
            let before = rng.i64(0..=3 * 365).min((diagnosed - birth).whole_days());
            resource["clinicalStatus"] = concept(CONDITION_CLINICAL, "active", "Active");
            resource["category"] = json!([concept(CONDITION_CATEGORY, "problem-list-item", "Problem List Item")]);
            resource["onsetDateTime"] = json!(format_date(diagnosed - Duration::days(before)));
        } else {
            resource["clinicalStatus"] = concept(CONDITION_CLINICAL, "resolved", "Resolved");
            resource["category"] = json!([concept(CONDITION_CATEGORY, "encounter-diagnosis", "Encounter Diagnosis")]);
            resource["onsetDateTime"] = json!(format_date(diagnosed));
            resource["abatementDateTime"] = json!(format_date(diagnosed + Duration::days(rng.i64(5..=21))));
        }
        entries.push(entry(urn_uuid(&mut rng), resource));
    }

    // MedicationRequests: distinct, each ordered at one of the encounters by its practitioner.
    for medication in distinct(&mut rng, MEDICATIONS.len(), counts.medications) {
        let (code, display, (form, form_code), route, per_day) = MEDICATIONS[medication];
        let encounter = pick(&mut rng, &encounters);
        let status = match rng.u32(..10) {
            0..=6 => "active",
            7..=8 => "completed",
            _ => "stopped",
        };
        let dose = rng.u32(1..=2);
        let often = match per_day {
            1 => "once daily".to_owned(),
            2 => "twice daily".to_owned(),
            n => format!("{n} times daily"),
        };
        let plural = if dose == 1 { "" } else { "s" };
        let resource = json!({
            "resourceType": "MedicationRequest",
            "status": status,
            "intent": "order",
            "medicationCodeableConcept": concept(RXNORM, code, display),
            "subject": subject(),
            "encounter": reference(encounter.full_url.clone()),
            "authoredOn": format_date_time(encounter.start),
            "requester": {
                "reference": practitioner_ref(encounter.practitioner),
                "display": practitioner_display(seed, encounter.practitioner)
            },
            "dosageInstruction": [{
                "sequence": 1,
                "text": format!("{dose} {form}{plural} {route} {often}"),
                "timing": { "repeat": { "frequency": per_day, "period": 1, "periodUnit": "d" } },
                "doseAndRate": [{ "doseQuantity": { "value": dose, "unit": form, "system": UCUM, "code": form_code } }]
            }]
        });
        entries.push(entry(urn_uuid(&mut rng), resource));
    }

    json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_known_before_generating() {
        for index in 0..300 {
            let bundle = synthetic_patient_bundle(7, index);
            let entries = bundle["entry"].as_array().map_or(0, Vec::len);
            assert_eq!(entries, synthetic_patient_entries(7, index), "patient {index}");
            assert!((10..=42).contains(&entries));
        }
    }

    #[test]
    fn distinct_draws_distinct_indices() {
        let mut rng = Rng::with_seed(3);
        for count in 0..=20 {
            let mut drawn = distinct(&mut rng, 16, count);
            assert_eq!(drawn.len(), count.min(16));
            drawn.sort_unstable();
            drawn.dedup();
            assert_eq!(drawn.len(), count.min(16));
            assert!(drawn.iter().all(|&i| i < 16));
        }
    }

    #[test]
    fn uuids_and_dates_are_well_formed() {
        let mut rng = Rng::with_seed(1);
        let urn = urn_uuid(&mut rng);
        let id = urn.strip_prefix("urn:uuid:").expect("urn:uuid prefix");
        let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(format_date(date!(2025 - 01 - 05)), "2025-01-05");
        let at = date!(2024 - 02 - 29).midnight() + Duration::minutes(9 * 60 + 5);
        assert_eq!(format_date_time(at), "2024-02-29T09:05:00Z");
    }

    #[test]
    fn references_point_into_the_bundle_or_the_directory() {
        let directory = synthetic_directory(5);
        let ids: Vec<String> = directory["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["request"]["url"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(ids.len(), ORGANIZATIONS + PRACTITIONERS);
        for index in 0..50 {
            let bundle = synthetic_patient_bundle(5, index);
            let entries = bundle["entry"].as_array().expect("entries");
            let full_urls: Vec<&str> = entries.iter().filter_map(|e| e["fullUrl"].as_str()).collect();
            let text = bundle.to_string();
            for reference in text.split("\"reference\":\"").skip(1).filter_map(|rest| rest.split('"').next()) {
                assert!(
                    full_urls.contains(&reference) || ids.iter().any(|id| id == reference),
                    "patient {index}: dangling reference {reference}"
                );
            }
        }
    }
}
