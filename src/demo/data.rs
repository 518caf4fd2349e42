//! The synthetic hospital's tables, generated from a fixed seed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Date32Builder, Float64Builder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How many rows to generate.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub patients: usize,
    pub staff: usize,
}

impl Sizes {
    /// Every size multiplied by `scale` (at least one patient and one staff member).
    pub fn scaled(self, scale: f64) -> Self {
        let by = |n: usize| ((n as f64 * scale).round() as usize).max(1);
        Self {
            patients: by(self.patients),
            staff: by(self.staff),
        }
    }
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            patients: 100_000,
            staff: 400,
        }
    }
}

const SEED: u64 = 0x41_49_52_4c_4f_43_4b; // "AIRLOCK"
const BATCH: usize = 16_384;
/// Bump when the generator changes, so stale files are rewritten.
const GENERATOR_VERSION: u32 = 2;

const FIRST: [&str; 24] = [
    "Ada", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal",
    "Lena", "Maya", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera",
    "Wen", "Yusuf",
];
const LAST: [&str; 20] = [
    "Almeida", "Berg", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Horvat", "Ivanova",
    "Jensen", "Kowalski", "Lopez", "Moreau", "Novak", "Okafor", "Petrov", "Rossi", "Schmidt",
    "Tanaka", "Weber",
];
const WARDS: [&str; 6] = ["A", "B", "C", "D", "E", "F"];
const DEPARTMENTS: [&str; 8] = [
    "cardiology",
    "emergency",
    "neurology",
    "oncology",
    "orthopedics",
    "pediatrics",
    "radiology",
    "surgery",
];
/// Diagnoses, most common first; weights fall geometrically so the tail is rare.
const DIAGNOSES: [&str; 30] = [
    "hypertension",
    "influenza",
    "type 2 diabetes",
    "asthma",
    "bronchitis",
    "fracture",
    "migraine",
    "pneumonia",
    "appendicitis",
    "gastritis",
    "anemia",
    "arrhythmia",
    "cellulitis",
    "concussion",
    "dermatitis",
    "gout",
    "hepatitis",
    "kidney stones",
    "lyme disease",
    "meningitis",
    "pancreatitis",
    "sepsis",
    "shingles",
    "tuberculosis",
    "cystic fibrosis",
    "huntington disease",
    "kawasaki disease",
    "addison disease",
    "wilson disease",
    "fabry disease",
];

fn zip_code(rng: &mut ChaCha8Rng) -> String {
    // 400 zips; u^4 skews heavily towards the first ones, leaving many rare zips.
    let u: f64 = rng.random();
    let idx = (u.powi(4) * 400.0) as usize;
    format!("{:05}", 10_000 + idx * 37)
}

/// One patient in 997 lives in one of 40 rural zips (90000-90039): at the default
/// 100 000 patients each holds two or three people, fewer than k, with no filter at all.
/// Chosen by position, so the rest of the generated data does not change.
fn rural_zip(patient: usize) -> Option<String> {
    (patient % 997 == 996).then(|| format!("{:05}", 90_000 + (patient / 997) % 40))
}

fn diagnosis(rng: &mut ChaCha8Rng) -> &'static str {
    let mut i = 0;
    while i + 1 < DIAGNOSES.len() && rng.random::<f64>() < 0.62 {
        i += 1;
    }
    DIAGNOSES[i]
}

fn patients_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("ssn", DataType::Utf8, false),
        Field::new("age", DataType::Int32, false),
        Field::new("sex", DataType::Utf8, false),
        Field::new("zip", DataType::Utf8, false),
        Field::new("ward", DataType::Utf8, false),
        Field::new("diagnosis", DataType::Utf8, false),
        Field::new("admitted", DataType::Date32, false),
        Field::new("length_of_stay", DataType::Int32, false),
        Field::new("cost", DataType::Float64, false),
    ]))
}

fn visits_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("visit_id", DataType::Int64, false),
        Field::new("patient_id", DataType::Int64, false),
        Field::new("visit_date", DataType::Date32, false),
        Field::new("department", DataType::Utf8, false),
        Field::new("cost", DataType::Float64, false),
    ]))
}

fn staff_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("staff_id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("ward", DataType::Utf8, false),
        Field::new("salary", DataType::Float64, false),
    ]))
}

/// 2020-01-01 as days since the epoch.
const DAY0: i32 = 18_262;

/// Writes the three tables under `dir/hospital/` unless files of the same generator
/// version and sizes are already there. Returns (table name, path) pairs.
pub fn write_hospital(dir: &Path, sizes: Sizes) -> std::io::Result<Vec<(String, PathBuf)>> {
    let out = dir.join("hospital");
    std::fs::create_dir_all(&out)?;
    let stamp = format!(
        "generator={GENERATOR_VERSION} patients={} staff={}\n",
        sizes.patients, sizes.staff
    );
    let stamp_file = out.join(".generated");
    let paths: Vec<(String, PathBuf)> = ["patients", "visits", "staff", "claims"]
        .iter()
        .map(|t| (format!("hospital.{t}"), out.join(format!("{t}.parquet"))))
        .collect();
    let fresh = std::fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp)
        && paths.iter().all(|(_, p)| p.exists());
    if fresh {
        return Ok(paths);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    write_patients(&paths[0].1, &mut rng, sizes.patients)?;
    write_visits(&paths[1].1, &mut rng, sizes.patients)?;
    write_staff(&paths[2].1, &mut rng, sizes.staff)?;
    write_claims(&paths[3].1, &mut rng, sizes.patients)?;
    std::fs::write(stamp_file, stamp)?;
    Ok(paths)
}

fn writer(path: &Path, schema: SchemaRef) -> std::io::Result<ArrowWriter<std::fs::File>> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    // Write to a temporary name first so a crash never leaves a half file in place.
    let file = std::fs::File::create(path.with_extension("parquet.tmp"))?;
    ArrowWriter::try_new(file, schema, Some(props)).map_err(std::io::Error::other)
}

fn finish(path: &Path, w: ArrowWriter<std::fs::File>) -> std::io::Result<()> {
    w.close().map_err(std::io::Error::other)?;
    std::fs::rename(path.with_extension("parquet.tmp"), path)
}

fn write_patients(path: &Path, rng: &mut ChaCha8Rng, n: usize) -> std::io::Result<()> {
    let schema = patients_schema();
    let mut w = writer(path, Arc::clone(&schema))?;
    let mut start = 0;
    while start < n {
        let len = BATCH.min(n - start);
        let (mut id, mut name, mut ssn, mut age, mut sex) = (
            Int64Builder::with_capacity(len),
            StringBuilder::new(),
            StringBuilder::new(),
            Int32Builder::with_capacity(len),
            StringBuilder::new(),
        );
        let (mut zip, mut ward, mut dx, mut admitted, mut los, mut cost) = (
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            Date32Builder::with_capacity(len),
            Int32Builder::with_capacity(len),
            Float64Builder::with_capacity(len),
        );
        for i in start..start + len {
            id.append_value(i as i64 + 1);
            name.append_value(format!(
                "{} {}",
                FIRST[rng.random_range(0..FIRST.len())],
                LAST[rng.random_range(0..LAST.len())]
            ));
            ssn.append_value(format!(
                "{:03}-{:02}-{:04}",
                rng.random_range(100..900),
                rng.random_range(10..100),
                rng.random_range(0..10_000)
            ));
            // Ages skew older: the max of two uniform draws.
            let a = rng.random_range(0..95).max(rng.random_range(0..95));
            age.append_value(a);
            sex.append_value(if rng.random_bool(0.52) { "F" } else { "M" });
            let drawn = zip_code(rng);
            zip.append_value(rural_zip(i).unwrap_or(drawn));
            ward.append_value(WARDS[(rng.random::<f64>().powi(2) * WARDS.len() as f64) as usize]);
            dx.append_value(diagnosis(rng));
            admitted.append_value(DAY0 + rng.random_range(0..1_800));
            let stay = 1 + (-(1.0 - rng.random::<f64>()).ln() * 4.0) as i32;
            los.append_value(stay);
            cost.append_value(
                ((500.0 + stay as f64 * rng.random_range(800.0..2_500.0)) * 100.0).round() / 100.0,
            );
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(name.finish()),
            Arc::new(ssn.finish()),
            Arc::new(age.finish()),
            Arc::new(sex.finish()),
            Arc::new(zip.finish()),
            Arc::new(ward.finish()),
            Arc::new(dx.finish()),
            Arc::new(admitted.finish()),
            Arc::new(los.finish()),
            Arc::new(cost.finish()),
        ];
        let batch =
            RecordBatch::try_new(Arc::clone(&schema), columns).map_err(std::io::Error::other)?;
        w.write(&batch).map_err(std::io::Error::other)?;
        start += len;
    }
    finish(path, w)
}

fn write_visits(path: &Path, rng: &mut ChaCha8Rng, patients: usize) -> std::io::Result<()> {
    let schema = visits_schema();
    let mut w = writer(path, Arc::clone(&schema))?;
    let mut visit_id = 0i64;
    let mut patient = 0usize;
    while patient < patients {
        let (mut vid, mut pid, mut date, mut dept, mut cost) = (
            Int64Builder::new(),
            Int64Builder::new(),
            Date32Builder::new(),
            StringBuilder::new(),
            Float64Builder::new(),
        );
        let end = (patient + BATCH / 4).min(patients);
        for p in patient..end {
            // One to seven visits, most patients two to four.
            let visits = 1 + rng.random_range(0..4) + rng.random_range(0..4);
            for _ in 0..visits {
                visit_id += 1;
                vid.append_value(visit_id);
                pid.append_value(p as i64 + 1);
                date.append_value(DAY0 + rng.random_range(0..1_800));
                dept.append_value(
                    DEPARTMENTS[(rng.random::<f64>().powi(2) * DEPARTMENTS.len() as f64) as usize],
                );
                cost.append_value((rng.random_range(40.0..4_000.0) * 100.0f64).round() / 100.0);
            }
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(vid.finish()),
            Arc::new(pid.finish()),
            Arc::new(date.finish()),
            Arc::new(dept.finish()),
            Arc::new(cost.finish()),
        ];
        let batch =
            RecordBatch::try_new(Arc::clone(&schema), columns).map_err(std::io::Error::other)?;
        w.write(&batch).map_err(std::io::Error::other)?;
        patient = end;
    }
    finish(path, w)
}

fn claims_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("claim_id", DataType::Int64, false),
        Field::new("patient_id", DataType::Int64, false),
        Field::new("claim_date", DataType::Date32, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("amount", DataType::Float64, false),
    ]))
}

/// Claim kinds, most common first; the last ones are rare (a handful of patients).
const CLAIM_KINDS: [&str; 8] = [
    "consultation",
    "pharmacy",
    "lab",
    "imaging",
    "surgery",
    "physiotherapy",
    "transplant",
    "gene_therapy",
];

/// Insurance claims (hospital.claims, released under differential privacy): zero to
/// nine per patient; amounts mostly below 2,000, with a long tail (the owner's bounds
/// clamp it).
fn write_claims(path: &Path, rng: &mut ChaCha8Rng, patients: usize) -> std::io::Result<()> {
    let schema = claims_schema();
    let mut w = writer(path, Arc::clone(&schema))?;
    let mut claim_id = 0i64;
    let mut patient = 0usize;
    while patient < patients {
        let (mut cid, mut pid, mut date, mut kind, mut amount) = (
            Int64Builder::new(),
            Int64Builder::new(),
            Date32Builder::new(),
            StringBuilder::new(),
            Float64Builder::new(),
        );
        let end = (patient + BATCH / 4).min(patients);
        for p in patient..end {
            let claims = rng.random_range(0..4) + rng.random_range(0..4) + rng.random_range(0..3);
            for _ in 0..claims {
                claim_id += 1;
                cid.append_value(claim_id);
                pid.append_value(p as i64 + 1);
                date.append_value(DAY0 + rng.random_range(0..1_800));
                // Geometric over kinds: the last two are very rare.
                let mut k = 0;
                while k + 1 < CLAIM_KINDS.len() && rng.random::<f64>() < 0.3 {
                    k += 1;
                }
                kind.append_value(CLAIM_KINDS[k]);
                let base: f64 = rng.random_range(20.0..2_000.0);
                let tail = if rng.random::<f64>() < 0.02 {
                    25.0
                } else {
                    1.0
                };
                amount.append_value((base * tail * 100.0).round() / 100.0);
            }
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(cid.finish()),
            Arc::new(pid.finish()),
            Arc::new(date.finish()),
            Arc::new(kind.finish()),
            Arc::new(amount.finish()),
        ];
        let batch =
            RecordBatch::try_new(Arc::clone(&schema), columns).map_err(std::io::Error::other)?;
        w.write(&batch).map_err(std::io::Error::other)?;
        patient = end;
    }
    finish(path, w)
}

fn write_staff(path: &Path, rng: &mut ChaCha8Rng, n: usize) -> std::io::Result<()> {
    let schema = staff_schema();
    let mut w = writer(path, Arc::clone(&schema))?;
    let (mut id, mut name, mut ward, mut salary) = (
        Int64Builder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        Float64Builder::new(),
    );
    for i in 0..n {
        id.append_value(i as i64 + 1);
        name.append_value(format!(
            "{} {}",
            FIRST[rng.random_range(0..FIRST.len())],
            LAST[rng.random_range(0..LAST.len())]
        ));
        ward.append_value(WARDS[rng.random_range(0..WARDS.len())]);
        salary.append_value((rng.random_range(42_000.0..180_000.0f64)).round());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(name.finish()),
        Arc::new(ward.finish()),
        Arc::new(salary.finish()),
    ];
    let batch = RecordBatch::try_new(schema, columns).map_err(std::io::Error::other)?;
    w.write(&batch).map_err(std::io::Error::other)?;
    finish(path, w)
}
