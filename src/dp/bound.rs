//! Contribution bounding (PRIVACY.md §5b): the part of the DP release that reads rows.
//!
//! The rule, for one query:
//! 1. at most C rows per (unit, group): the C rows with the smallest keyed hash of their
//!    content (never their arrival order, which the analyst could influence);
//! 2. at most L0 groups per unit: the L0 groups with the smallest keyed SHA-256 of
//!    (unit, group);
//! 3. values clamped to the owner's bounds, in fixed point, summed in checked `i128`.
//!
//! Two readers apply it, with the same result (a property test compares both with the
//! rule applied eagerly):
//! - [`Runs`], when every input partition delivers its units in increasing order (a table
//!   stored sorted by its unit, as TPC-H's line items by order). A unit's rows then
//!   arrive together, so the unit is bounded and added to its groups' totals as soon as
//!   the next unit starts: nothing is kept per unit, and no repartition is needed. Most
//!   units are whole inside one batch and small enough that the bounds cut nothing; their
//!   rows go straight to the totals, without being kept at all ([`Runs::direct`]). A
//!   partition's first and last units may continue in another partition; they stay open
//!   and are bounded together once every partition has ended ([`combine`]). A row out of
//!   order, or partitions whose ranges of units meet other than end to end, and the
//!   reader gives up: the caller starts again with [`Scattered`].
//! - [`Scattered`], for rows in any order, hash-partitioned by unit: every unit's cells
//!   are kept in a map until the partition ends.
//!
//! Units and group keys are compared as Arrow row bytes, whose byte order is the
//! values' order, so the clustered reader works for a unit of any type.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Decimal128Type, Field, Float64Type, Int64Type, Schema,
};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::DataFusionError;
use datafusion::error::Result;
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use sha2::{Digest, Sha256};

use crate::policy::dp::{DpPolicy, FIXED_SCALE, to_fixed};

/// One group's units, rows and per-value sums, after bounding.
pub type Group = (i128, i128, Vec<i128>);

/// Per group key (its row bytes).
pub type Totals = HashMap<Box<[u8]>, Group>;

/// The first and last unit a partition read, as row bytes.
pub type Range = (Box<[u8]>, Box<[u8]>);

pub fn overflow() -> DataFusionError {
    DataFusionError::Execution("DP release: a sum overflows".into())
}

/// Adds the totals of disjoint units to `into`.
pub fn merge(into: &mut Totals, part: Totals, values: usize) -> Result<()> {
    for (key, (units, rows, sums)) in part {
        let g = into.entry(key).or_insert_with(|| (0, 0, vec![0; values]));
        add_group(g, units, rows, &sums)?;
    }
    Ok(())
}

fn add_group(g: &mut Group, units: i128, rows: i128, sums: &[i128]) -> Result<()> {
    g.0 = g.0.checked_add(units).ok_or_else(overflow)?;
    g.1 = g.1.checked_add(rows).ok_or_else(overflow)?;
    for (t, v) in g.2.iter_mut().zip(sums) {
        *t = t.checked_add(*v).ok_or_else(overflow)?;
    }
    Ok(())
}

/// The rule's parameters for one query.
#[derive(Debug, Clone)]
pub struct Rule {
    /// C: rows per (unit, group).
    pub c: usize,
    /// L0: groups per unit.
    pub l0: usize,
    /// The query's seed, which keys both hashes.
    pub seed: [u8; 32],
    /// Each value column's clamp range, in fixed point.
    pub clamp: Vec<(i64, i64)>,
}

impl Rule {
    pub fn new(policy: &DpPolicy, clamp: Vec<(i64, i64)>, seed: [u8; 32]) -> Self {
        Self {
            c: usize::try_from(policy.max_rows_per_group_per_unit).unwrap_or(usize::MAX),
            l0: usize::try_from(policy.max_groups_per_unit).unwrap_or(usize::MAX),
            seed,
            clamp,
        }
    }

    fn values(&self) -> usize {
        self.clamp.len()
    }

    /// A cell is trimmed to C while it is read once it holds this many rows, so memory
    /// stays bounded whatever one unit holds.
    fn trim_at(&self) -> usize {
        2 * self.c.max(16)
    }
}

/// The keyed hash that orders a cell's rows for the C bound: a function of the query's
/// seed and the row's content (unit, group, values), never of its position.
pub(crate) fn row_hash(seed: &[u8; 32], unit: &[u8], key: &[u8], vals: &[Option<i64>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut h);
    unit.hash(&mut h);
    key.hash(&mut h);
    vals.hash(&mut h);
    h.finish()
}

/// The keyed SHA-256 that orders a unit's groups for the L0 bound.
pub(crate) fn group_hash(seed: &[u8; 32], unit: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"airlock-dp-l0");
    h.update(seed);
    h.update((unit.len() as u64).to_be_bytes());
    h.update(unit);
    h.update(key);
    h.finalize().into()
}

/// The rows one unit gives one group, before bounding.
#[derive(Debug, Default)]
struct Cell {
    /// The group key's id (its index in [`Layout::keys`]).
    key: u32,
    rows: usize,
    /// `rows × values` fixed-point values, row after row (None for NULL).
    vals: Vec<Option<i64>>,
}

/// Keeps the C rows of a cell with the smallest keyed hashes (ties broken by value).
/// Trimming a part of a cell first keeps the same rows: the order is total.
fn trim(cell: &mut Cell, rule: &Rule, unit: &[u8], key: &[u8]) {
    let (c, nv) = (rule.c, rule.values());
    if cell.rows <= c {
        return;
    }
    let mut rows: Vec<(u64, &[Option<i64>])> = (0..cell.rows)
        .map(|r| {
            let v = &cell.vals[r * nv..(r + 1) * nv];
            (row_hash(&rule.seed, unit, key, v), v)
        })
        .collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    rows.truncate(c);
    let vals = rows.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    cell.rows = rows.len();
    cell.vals = vals;
}

/// What the bounded units give each group so far, indexed by key id: units, rows and
/// per-value sums, each in one flat vector.
#[derive(Debug, Default)]
struct Tally {
    values: usize,
    units: Vec<i128>,
    rows: Vec<i128>,
    /// `values` sums per key.
    sums: Vec<i128>,
}

impl Tally {
    fn new(values: usize) -> Self {
        Self {
            values,
            ..Self::default()
        }
    }

    /// Room for `keys` key ids.
    fn grow(&mut self, keys: usize) {
        if self.units.len() < keys {
            self.units.resize(keys, 0);
            self.rows.resize(keys, 0);
            self.sums.resize(keys * self.values, 0);
        }
    }

    fn add_unit(&mut self, key: usize) -> Result<()> {
        let u = &mut self.units[key];
        *u = u.checked_add(1).ok_or_else(overflow)?;
        Ok(())
    }

    /// One row, its values as read (NULLs add nothing).
    fn add_row(&mut self, key: usize, read: &Read, r: usize) -> Result<()> {
        let n = &mut self.rows[key];
        *n = n.checked_add(1).ok_or_else(overflow)?;
        let sums = &mut self.sums[key * self.values..(key + 1) * self.values];
        for (s, a) in sums.iter_mut().zip(&read.values) {
            if a.is_valid(r) {
                *s = s.checked_add(i128::from(a.value(r))).ok_or_else(overflow)?;
            }
        }
        Ok(())
    }

    /// A kept cell: its rows, its values.
    fn add_cell(&mut self, cell: &Cell) -> Result<()> {
        let key = cell.key as usize;
        self.add_unit(key)?;
        let n = &mut self.rows[key];
        *n = n.checked_add(cell.rows as i128).ok_or_else(overflow)?;
        if self.values > 0 {
            let sums = &mut self.sums[key * self.values..(key + 1) * self.values];
            for row in cell.vals.chunks_exact(self.values) {
                for (s, v) in sums.iter_mut().zip(row) {
                    if let Some(v) = v {
                        *s = s.checked_add(i128::from(*v)).ok_or_else(overflow)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Per key into [`Totals`], keyed by the keys' bytes. A group every one of whose
    /// units spent their L0 elsewhere is not there at all.
    fn keyed(self, keys: &[Box<[u8]>]) -> Totals {
        let nv = self.values;
        keys.iter()
            .enumerate()
            .filter(|(id, _)| self.units.get(*id).is_some_and(|u| *u > 0))
            .map(|(id, key)| {
                let sums = self.sums[id * nv..(id + 1) * nv].to_vec();
                (key.clone(), (self.units[id], self.rows[id], sums))
            })
            .collect()
    }
}

/// Bounds one unit's cells (C rows each, L0 cells) and adds them to `tally`. Leaves
/// the kept cells in `cells`.
fn bound_unit(
    rule: &Rule,
    keys: &[Box<[u8]>],
    unit: &[u8],
    cells: &mut Vec<Cell>,
    tally: &mut Tally,
) -> Result<()> {
    for cell in cells.iter_mut() {
        trim(cell, rule, unit, &keys[cell.key as usize]);
    }
    if cells.len() > rule.l0 {
        let mut ranked: Vec<([u8; 32], Cell)> = cells
            .drain(..)
            .map(|c| (group_hash(&rule.seed, unit, &keys[c.key as usize]), c))
            .collect();
        ranked.sort_unstable_by_key(|a| a.0);
        ranked.truncate(rule.l0);
        cells.extend(ranked.into_iter().map(|(_, c)| c));
    }
    tally.grow(keys.len());
    for cell in cells.iter() {
        tally.add_cell(cell)?;
    }
    Ok(())
}

/// The input's layout (unit, `groups` keys, values) and the group keys seen so far.
pub struct Layout {
    units: RowConverter,
    unit_type: DataType,
    /// Whether units are integers, compared as `i64` (in the values' order) rather
    /// than as row bytes by the clustered reader.
    int_units: bool,
    keys: RowConverter,
    groups: usize,
    /// DataFusion's interner of group keys (the one its hash aggregate uses): ids from 0.
    interner: Box<dyn GroupValues>,
    /// Per interner id, our id (`u32::MAX` until its row bytes are looked up).
    ours: Vec<u32>,
    /// Our id of each key's row bytes.
    by_bytes: HashMap<Box<[u8]>, u32>,
    /// Every key seen, by id, as row bytes.
    pub keys_seen: Vec<Box<[u8]>>,
}

/// The units of one batch.
enum Units {
    /// Integer units as `i64`.
    Int(Int64Array),
    Rows(Rows),
}

/// One batch as the readers see it.
struct Read {
    units: Units,
    /// Its NULLs: a row without a unit belongs to no one we can bound, and is dropped.
    unit_nulls: Option<NullBuffer>,
    /// The group key's id, per row.
    ids: Vec<usize>,
    /// Each value column in fixed point, clamped (NaN to the lower bound).
    values: Vec<Int64Array>,
}

impl Layout {
    /// `input`: the DP node's input schema (unit, keys, values).
    pub fn new(input: &Schema, groups: usize) -> Result<Self> {
        let unit_type = input.field(0).data_type().clone();
        // A global aggregate has one group, keyed by a constant.
        let key_fields: Vec<Field> = if groups == 0 {
            vec![Field::new("global", DataType::Boolean, false)]
        } else {
            (1..=groups).map(|i| input.field(i).clone()).collect()
        };
        let keys = key_fields
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let interner = new_group_values(Arc::new(Schema::new(key_fields)), &GroupOrdering::None)?;
        Ok(Self {
            int_units: fits_i64(&unit_type),
            units: RowConverter::new(vec![SortField::new(unit_type.clone())])?,
            unit_type,
            keys: RowConverter::new(keys)?,
            groups,
            interner,
            ours: Vec::new(),
            by_bytes: HashMap::new(),
            keys_seen: Vec::new(),
        })
    }

    /// The converter of group keys (to turn released keys back into columns).
    pub fn key_converter(&self) -> &RowConverter {
        &self.keys
    }

    /// The row bytes of the global aggregate's one key.
    pub fn global_key(&self) -> Result<Box<[u8]>> {
        let k = self.keys.convert_columns(&[global_key(1)])?;
        Ok(k.row(0).as_ref().into())
    }

    /// The row bytes of an integer unit, read as `i64`: the same bytes as its row
    /// in the input (the value is cast back to the column's type, exactly).
    fn int_unit_bytes(&self, unit: i64) -> Result<Vec<u8>> {
        let one: ArrayRef = Arc::new(Int64Array::from(vec![unit]));
        let rows = self
            .units
            .convert_columns(&[cast(&one, &self.unit_type)?])?;
        Ok(rows.row(0).as_ref().to_vec())
    }

    /// Each row's key id. DataFusion's interner finds equal keys fast; our ids are
    /// those of the keys' row bytes (so ids never depend on which row came first, nor on
    /// the order the interner numbers new keys in), looked up once per interner id.
    fn intern(&mut self, keys: &[ArrayRef], ids: &mut Vec<usize>) -> Result<()> {
        let keys: Vec<ArrayRef> = keys.iter().map(canonical_zeros).collect::<Result<_>>()?;
        let mut found = Vec::with_capacity(ids.capacity());
        self.interner.intern(&keys, &mut found)?;
        self.ours.resize(self.interner.len(), u32::MAX);
        ids.clear();
        for (r, id) in found.into_iter().enumerate() {
            if self.ours[id] == u32::MAX {
                let one: Vec<ArrayRef> = keys.iter().map(|k| k.slice(r, 1)).collect();
                let rows = self.keys.convert_columns(&one)?;
                self.ours[id] = self.id(rows.row(0).as_ref())?;
            }
            ids.push(self.ours[id] as usize);
        }
        Ok(())
    }

    /// The id of a key given as row bytes.
    fn id(&mut self, key: &[u8]) -> Result<u32> {
        if let Some(id) = self.by_bytes.get(key) {
            return Ok(*id);
        }
        let id = u32::try_from(self.keys_seen.len())
            .ok()
            .filter(|id| *id < u32::MAX)
            .ok_or_else(|| DataFusionError::Execution("DP release: too many groups".into()))?;
        self.by_bytes.insert(key.into(), id);
        self.keys_seen.push(key.into());
        Ok(id)
    }

    /// `rows`: whether the units are wanted as row bytes even when they are integers.
    fn read(&mut self, batch: &RecordBatch, rule: &Rule, rows: bool) -> Result<Read> {
        let g = self.groups;
        let unit_column = Arc::clone(batch.column(0));
        let units = if self.int_units && !rows {
            let ints = cast(&unit_column, &DataType::Int64)?;
            Units::Int(ints.as_primitive::<Int64Type>().clone())
        } else {
            Units::Rows(self.units.convert_columns(&[Arc::clone(&unit_column)])?)
        };
        let keys = if g == 0 {
            vec![global_key(batch.num_rows())]
        } else {
            batch.columns()[1..=g].to_vec()
        };
        let mut ids = Vec::with_capacity(batch.num_rows());
        self.intern(&keys, &mut ids)?;
        let values = batch.columns()[g + 1..]
            .iter()
            .zip(&rule.clamp)
            .map(|(c, clamp)| fixed(c, *clamp))
            .collect::<Result<_>>()?;
        Ok(Read {
            units,
            unit_nulls: unit_column.logical_nulls(),
            ids,
            values,
        })
    }
}

impl Read {
    fn has_unit(&self, r: usize) -> bool {
        self.unit_nulls.as_ref().is_none_or(|n| n.is_valid(r))
    }

    /// The end of the run of rows from `r` (which has a unit) whose unit is `r`'s,
    /// rows without a unit among them included.
    fn run_end(&self, r: usize) -> usize {
        let n = self.ids.len();
        if let (Units::Int(a), None) = (&self.units, &self.unit_nulls) {
            let (v, u) = (a.values(), a.value(r));
            return (r + 1..n).find(|e| v[*e] != u).unwrap_or(n);
        }
        let same = |e: usize| -> bool {
            !self.has_unit(e)
                || match &self.units {
                    Units::Int(a) => a.value(e) == a.value(r),
                    Units::Rows(rows) => rows.row(e) == rows.row(r),
                }
        };
        (r + 1..n).find(|e| !same(*e)).unwrap_or(n)
    }
}

/// A value column in fixed point ([`FIXED_SCALE`]), clamped to `(lo, hi)`. Decimals and
/// integers are scaled exactly (decimals rounded half away from zero where they carry
/// more digits than the fixed point); floats through [`to_fixed`], NaN to `lo`.
fn fixed(c: &ArrayRef, (lo, hi): (i64, i64)) -> Result<Int64Array> {
    const DIGITS: i32 = FIXED_SCALE.ilog10() as i32;
    const _: () = assert!(10_i64.pow(DIGITS as u32) == FIXED_SCALE);
    let saturate = |v: i128| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    Ok(match c.data_type() {
        DataType::Decimal128(_, scale) => {
            let a = c.as_primitive::<Decimal128Type>();
            let shift = DIGITS - i32::from(*scale);
            if shift >= 0 {
                let m = 10_i128.checked_pow(shift as u32).unwrap_or(i128::MAX);
                match i64::try_from(m) {
                    // The common case in i64 arithmetic; i128 only past its range.
                    Ok(m64) => a.unary(|v| {
                        match i64::try_from(v) {
                            Ok(v) => v.saturating_mul(m64),
                            Err(_) => saturate(v.saturating_mul(m)),
                        }
                        .clamp(lo, hi)
                    }),
                    Err(_) => a.unary(|v| saturate(v.saturating_mul(m)).clamp(lo, hi)),
                }
            } else {
                match 10_i128.checked_pow((-shift) as u32) {
                    Some(d) => a.unary(|v| {
                        let (q, r) = (v / d, v % d);
                        let q = if r.unsigned_abs() * 2 >= d.unsigned_abs() {
                            q + v.signum()
                        } else {
                            q
                        };
                        saturate(q).clamp(lo, hi)
                    }),
                    // More than 38 digits after the point: every value rounds to 0.
                    None => a.unary(|_| 0_i64.clamp(lo, hi)),
                }
            }
        }
        t if fits_i64(t) => cast(c, &DataType::Int64)?
            .as_primitive::<Int64Type>()
            .unary(|v| v.saturating_mul(FIXED_SCALE).clamp(lo, hi)),
        _ => cast(c, &DataType::Float64)?
            .as_primitive::<Float64Type>()
            .unary(|v| {
                if v.is_nan() {
                    lo
                } else {
                    to_fixed(v).clamp(lo, hi)
                }
            }),
    })
}

/// A key column with -0.0 as 0.0 and every NaN as one NaN: values an interner may call
/// equal, given the same row bytes (so the first row's sign never names the group).
fn canonical_zeros(c: &ArrayRef) -> Result<ArrayRef> {
    Ok(match c.data_type() {
        DataType::Float64 => Arc::new(c.as_primitive::<Float64Type>().unary::<_, Float64Type>(
            |v| {
                if v == 0.0 {
                    0.0
                } else if v.is_nan() {
                    f64::NAN
                } else {
                    v
                }
            },
        )),
        // Exactly representable in Float64 and back.
        DataType::Float32 | DataType::Float16 => cast(
            &canonical_zeros(&cast(c, &DataType::Float64)?)?,
            c.data_type(),
        )?,
        _ => Arc::clone(c),
    })
}

/// Integer types whose every value is an `i64`, in the same order.
fn fits_i64(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
    )
}

fn global_key(n: usize) -> ArrayRef {
    Arc::new(BooleanArray::from(vec![true; n]))
}

/// Appends row `r`'s values to `cell`.
fn push_row(cell: &mut Cell, read: &Read, r: usize) {
    cell.rows += 1;
    for a in &read.values {
        cell.vals.push((!a.is_null(r)).then(|| a.values()[r]));
    }
}

/// The cell of `key` among a unit's cells (few), added if new.
fn cell_for<'a>(
    cells: &'a mut Vec<Cell>,
    key: u32,
    spare: &mut Vec<Vec<Option<i64>>>,
) -> &'a mut Cell {
    let i = match cells.iter().position(|c| c.key == key) {
        Some(i) => i,
        None => {
            cells.push(Cell {
                key,
                rows: 0,
                vals: spare.pop().unwrap_or_default(),
            });
            cells.len() - 1
        }
    };
    &mut cells[i]
}

/// Rows in any order (hash-partitioned by unit): per unit, its cells, until the end.
pub struct Scattered {
    layout: Layout,
    rule: Rule,
    cells: hashbrown::HashMap<Box<[u8]>, Vec<Cell>>,
}

impl Scattered {
    pub fn new(layout: Layout, rule: Rule) -> Self {
        Self {
            layout,
            rule,
            cells: hashbrown::HashMap::new(),
        }
    }

    pub fn add(&mut self, batch: &RecordBatch) -> Result<()> {
        let read = self.layout.read(batch, &self.rule, true)?;
        let Units::Rows(units) = &read.units else {
            return Err(DataFusionError::Internal(
                "DP release: units as rows".into(),
            ));
        };
        let mut spare = Vec::new();
        for r in 0..batch.num_rows() {
            if !read.has_unit(r) {
                continue;
            }
            let unit = units.row(r);
            let cells = self.cells.entry_ref(unit.as_ref()).or_default();
            let cell = cell_for(cells, read.ids[r] as u32, &mut spare);
            push_row(cell, &read, r);
            if cell.rows > self.rule.trim_at() {
                let key = &self.layout.keys_seen[cell.key as usize];
                trim(cell, &self.rule, unit.as_ref(), key);
            }
        }
        Ok(())
    }

    /// Adds cells read elsewhere (the open ends of [`Runs`]).
    fn add_cells(&mut self, unit: &[u8], cells: Vec<OpenCell>) -> Result<()> {
        for c in cells {
            let id = self.layout.id(&c.key)?;
            let mine = self.cells.entry_ref(unit).or_default();
            let cell = cell_for(mine, id, &mut Vec::new());
            cell.rows += c.rows;
            cell.vals.extend(c.vals);
            if cell.rows > self.rule.trim_at() {
                trim(cell, &self.rule, unit, &c.key);
            }
        }
        Ok(())
    }

    /// Bounds every unit and totals what they give each group.
    pub fn finish(self) -> Result<Totals> {
        let keys = &self.layout.keys_seen;
        let mut tally = Tally::new(self.rule.values());
        for (unit, mut cells) in self.cells {
            bound_unit(&self.rule, keys, &unit, &mut cells, &mut tally)?;
        }
        Ok(tally.keyed(keys))
    }
}

/// A cell of an open unit, keyed by its group key's bytes (ids are per partition).
#[derive(Debug)]
pub struct OpenCell {
    key: Box<[u8]>,
    rows: usize,
    vals: Vec<Option<i64>>,
}

/// What [`Runs`] leaves when its partition ends.
#[derive(Debug)]
pub struct RunsEnd {
    /// The first and last unit read (none if no row had a unit).
    pub range: Option<Range>,
    /// The units between them, bounded.
    pub totals: Totals,
    /// The first and last units' cells, to be bounded with the other partitions'.
    open: Vec<(Box<[u8]>, Vec<OpenCell>)>,
}

/// Rows that arrive in increasing order of unit: each unit bounded when the next starts.
pub struct Runs {
    layout: Layout,
    rule: Rule,
    tally: Tally,
    /// The partition's first unit and its cells: it may have begun in another partition.
    first: Option<(Box<[u8]>, Vec<Cell>)>,
    /// The unit being read, and its cells.
    current: Option<Current>,
    cells: Vec<Cell>,
    /// Value buffers of bounded cells, for reuse.
    spare: Vec<Vec<Option<i64>>>,
    /// For [`Runs::direct`]: per key id, the last run that met it and its rows there.
    seen_in: Vec<(u64, usize)>,
    /// The number of runs [`Runs::direct`] has looked at.
    run: u64,
    /// The keys of the run [`Runs::direct`] is looking at.
    run_keys: Vec<usize>,
    /// Units added by [`Runs::direct`], and units kept as cells: how the work went.
    pub added_whole: u64,
    pub kept: u64,
}

/// The unit a [`Runs`] is reading.
struct Current {
    /// The unit, for integer units.
    int: i64,
    /// Its row bytes: read for other units, made from `int` for integers when needed
    /// (to hash its rows, or at the ends of the partition).
    bytes: Option<Vec<u8>>,
    /// Whether it was added whole ([`Runs::direct`]): no row of it may follow.
    whole: bool,
}

impl Current {
    fn bytes(&mut self, layout: &Layout) -> Result<&[u8]> {
        if self.bytes.is_none() {
            self.bytes = Some(layout.int_unit_bytes(self.int)?);
        }
        Ok(self.bytes.as_deref().unwrap_or_default())
    }
}

impl Runs {
    pub fn new(layout: Layout, rule: Rule) -> Self {
        Self {
            tally: Tally::new(rule.values()),
            layout,
            rule,
            first: None,
            current: None,
            cells: Vec::new(),
            spare: Vec::new(),
            seen_in: Vec::new(),
            run: 0,
            run_keys: Vec::new(),
            added_whole: 0,
            kept: 0,
        }
    }

    /// Reads a batch; false when a unit arrives after a greater one (the rows are not
    /// in order: this reader cannot bound them).
    ///
    /// The batch is read a run of rows of one unit at a time. A run that ends inside the
    /// batch and is not the partition's first unit is whole, and most are small enough
    /// that the bounds cut nothing: those go straight to the totals ([`Runs::direct`]).
    /// The others are kept as cells and bounded when the next unit starts.
    pub fn add(&mut self, batch: &RecordBatch) -> Result<bool> {
        let read = self.layout.read(batch, &self.rule, false)?;
        let keys = self.layout.keys_seen.len();
        self.tally.grow(keys);
        self.seen_in.resize(keys, (0, 0));
        let n = batch.num_rows();
        let mut r = 0;
        while r < n {
            if !read.has_unit(r) {
                r += 1;
                continue;
            }
            let end = read.run_end(r);
            let order = self.current.as_ref().map(|c| match &read.units {
                Units::Int(a) => a.value(r).cmp(&c.int),
                Units::Rows(rows) => rows
                    .row(r)
                    .as_ref()
                    .cmp(c.bytes.as_deref().unwrap_or_default()),
            });
            match order {
                Some(Ordering::Equal) if self.current.as_ref().is_some_and(|c| c.whole) => {
                    // Cannot happen (a unit is added whole only when the next one began
                    // in the same batch); if it did, its rows would count twice.
                    return Err(DataFusionError::Internal(
                        "DP release: rows of a unit already bounded".into(),
                    ));
                }
                Some(Ordering::Equal) => {}
                Some(Ordering::Less) => return Ok(false),
                Some(Ordering::Greater) | None => {
                    self.close()?;
                    let mut bytes = self.current.take().and_then(|c| c.bytes);
                    let int = match &read.units {
                        Units::Int(a) => {
                            bytes = None;
                            a.value(r)
                        }
                        Units::Rows(rows) => {
                            let b = bytes.get_or_insert_with(Vec::new);
                            b.clear();
                            b.extend_from_slice(rows.row(r).as_ref());
                            0
                        }
                    };
                    self.current = Some(Current {
                        int,
                        bytes,
                        whole: false,
                    });
                    if end < n && self.first.is_some() && self.direct(&read, r..end)? {
                        if let Some(c) = self.current.as_mut() {
                            c.whole = true;
                        }
                        self.added_whole += 1;
                        r = end;
                        continue;
                    }
                }
            }
            for i in r..end {
                if !read.has_unit(i) {
                    continue;
                }
                let cell = cell_for(&mut self.cells, read.ids[i] as u32, &mut self.spare);
                push_row(cell, &read, i);
                if cell.rows > self.rule.trim_at()
                    && let Some(current) = self.current.as_mut()
                {
                    let key = &self.layout.keys_seen[cell.key as usize];
                    trim(cell, &self.rule, current.bytes(&self.layout)?, key);
                }
            }
            r = end;
        }
        Ok(true)
    }

    /// Adds a whole unit's rows to the totals as they are, if the bounds would cut
    /// nothing from them: no more than L0 groups, no more than C rows in any. Then
    /// [`bound_unit`] would keep every row, and add the same sums (integers, in any
    /// order). False, and nothing added, otherwise.
    fn direct(&mut self, read: &Read, rows: std::ops::Range<usize>) -> Result<bool> {
        self.run += 1;
        self.run_keys.clear();
        for i in rows.clone() {
            if !read.has_unit(i) {
                continue;
            }
            let id = read.ids[i];
            let seen = &mut self.seen_in[id];
            if seen.0 != self.run {
                *seen = (self.run, 0);
                self.run_keys.push(id);
                if self.run_keys.len() > self.rule.l0 {
                    return Ok(false);
                }
            }
            seen.1 += 1;
            if seen.1 > self.rule.c {
                return Ok(false);
            }
        }
        for i in rows {
            if read.has_unit(i) {
                self.tally.add_row(read.ids[i], read, i)?;
            }
        }
        for id in &self.run_keys {
            self.tally.add_unit(*id)?;
        }
        Ok(true)
    }

    /// The first and the current unit, as row bytes.
    pub fn range(&mut self) -> Result<Option<Range>> {
        let Some(current) = self.current.as_mut() else {
            return Ok(None);
        };
        let current: Box<[u8]> = current.bytes(&self.layout)?.into();
        let first = match &self.first {
            Some((f, _)) => f.clone(),
            None => current.clone(),
        };
        Ok(Some((first, current)))
    }

    /// Ends the current unit: the partition's first stays open, any other is bounded.
    fn close(&mut self) -> Result<()> {
        let Some(current) = self.current.as_mut() else {
            return Ok(());
        };
        if self.first.is_none() {
            let unit = current.bytes(&self.layout)?.into();
            self.first = Some((unit, std::mem::take(&mut self.cells)));
            return Ok(());
        }
        if self.cells.is_empty() {
            // Added directly ([`Runs::direct`]).
            return Ok(());
        }
        self.kept += 1;
        // The unit's bytes key the hashes, which only a cut needs.
        let cut =
            self.cells.len() > self.rule.l0 || self.cells.iter().any(|c| c.rows > self.rule.c);
        let unit = if cut {
            current.bytes(&self.layout)?
        } else {
            &[]
        };
        bound_unit(
            &self.rule,
            &self.layout.keys_seen,
            unit,
            &mut self.cells,
            &mut self.tally,
        )?;
        for mut c in self.cells.drain(..) {
            c.vals.clear();
            self.spare.push(c.vals);
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<RunsEnd> {
        let range = self.range()?;
        let keys = &self.layout.keys_seen;
        let open_cells = |cells: Vec<Cell>| -> Vec<OpenCell> {
            cells
                .into_iter()
                .map(|c| OpenCell {
                    key: keys[c.key as usize].clone(),
                    rows: c.rows,
                    vals: c.vals,
                })
                .collect()
        };
        // The current unit is never the first: that one was put aside when a greater
        // unit began.
        let mut open = Vec::new();
        if let Some((unit, cells)) = self.first.take() {
            open.push((unit, open_cells(cells)));
        }
        if let Some((_, last)) = &range
            && self.current.is_some()
        {
            open.push((last.clone(), open_cells(std::mem::take(&mut self.cells))));
        }
        Ok(RunsEnd {
            range,
            totals: self.tally.keyed(keys),
            open,
        })
    }
}

/// Whether partitions with these ranges of units can be bounded apart: no two share a
/// unit, except one at an end of both (such a unit is open in both and bounded once).
pub fn ranges_fit(ranges: &[Option<Range>]) -> bool {
    let ranges: Vec<_> = ranges.iter().flatten().collect();
    for (i, (a, b)) in ranges.iter().enumerate() {
        for (c, d) in &ranges[i + 1..] {
            let (lo, hi) = (a.max(c), b.min(d));
            match lo.cmp(hi) {
                Ordering::Greater => {}
                Ordering::Equal if (lo == a || lo == b) && (lo == c || lo == d) => {}
                _ => return false,
            }
        }
    }
    true
}

/// The totals of partitions read by [`Runs`]: their own, plus their open units bounded
/// across partitions. None if the partitions' ranges do not fit ([`ranges_fit`]).
pub fn combine(parts: Vec<RunsEnd>, layout: Layout, rule: Rule) -> Result<Option<Totals>> {
    let ranges: Vec<_> = parts.iter().map(|p| p.range.clone()).collect();
    if !ranges_fit(&ranges) {
        return Ok(None);
    }
    let nv = rule.values();
    let mut open = Scattered::new(layout, rule);
    let mut totals = Totals::new();
    for part in parts {
        merge(&mut totals, part.totals, nv)?;
        for (unit, cells) in part.open {
            open.add_cells(&unit, cells)?;
        }
    }
    merge(&mut totals, open.finish()?, nv)?;
    Ok(Some(totals))
}

#[cfg(test)]
mod tests {
    //! Both readers against the rule applied eagerly (every row hashed on arrival), on
    //! random data, random batch boundaries and random cuts between partitions.
    use super::*;
    use datafusion::arrow::array::{Float64Array, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, SchemaRef};
    use rand::Rng;

    type Row = (i64, &'static str, f64);
    const GROUPS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

    thread_local! {
        /// Units as zero-padded strings instead of integers (row bytes, not `i64`).
        static STRING_UNITS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn schema() -> SchemaRef {
        let unit = if STRING_UNITS.get() {
            DataType::Utf8
        } else {
            DataType::Int64
        };
        Arc::new(Schema::new(vec![
            Field::new("unit", unit, true),
            Field::new("key", DataType::Utf8, true),
            Field::new("v", DataType::Float64, true),
            Field::new("w", DataType::Float64, true),
        ]))
    }

    /// A row's second value: NULL for every fifth value, else three times the first (so
    /// past its clamp at times).
    fn w(v: f64) -> Option<f64> {
        ((v as i64) % 5 != 0).then_some(v * 3.0)
    }

    /// The clamps of the two values.
    const CLAMP: [(i64, i64); 2] = [(0, 100 * FIXED_SCALE), (0, 200 * FIXED_SCALE)];

    /// A row's values as the readers keep them: fixed point, clamped.
    fn fixed_values(v: f64) -> Vec<Option<i64>> {
        vec![
            Some(to_fixed(v).clamp(CLAMP[0].0, CLAMP[0].1)),
            w(v).map(|w| to_fixed(w).clamp(CLAMP[1].0, CLAMP[1].1)),
        ]
    }

    /// Rows as a batch; a negative unit is a NULL unit.
    fn batch(rows: &[Row]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                if STRING_UNITS.get() {
                    Arc::new(StringArray::from(
                        rows.iter()
                            .map(|r| (r.0 >= 0).then(|| format!("u{:05}", r.0)))
                            .collect::<Vec<_>>(),
                    ))
                } else {
                    Arc::new(Int64Array::from(
                        rows.iter()
                            .map(|r| (r.0 >= 0).then_some(r.0))
                            .collect::<Vec<_>>(),
                    ))
                },
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| w(r.2)).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn layout() -> Layout {
        Layout::new(&schema(), 1).unwrap()
    }

    fn rule(l0: usize, c: usize) -> Rule {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut seed);
        Rule {
            c,
            l0,
            seed,
            clamp: CLAMP.to_vec(),
        }
    }

    /// Up to 80 rows per cell (past 2·max(C, 16), so cells are trimmed while read).
    fn random_rows(n: usize) -> Vec<Row> {
        random_rows_of(n, 40)
    }

    /// `n` rows over `units` units.
    fn random_rows_of(n: usize, units: i64) -> Vec<Row> {
        let mut rng = rand::rng();
        (0..n)
            .map(|_| {
                (
                    // Now and then a row without a unit.
                    if rng.random_range(0..30) == 0 {
                        -1
                    } else {
                        rng.random_range(0..units)
                    },
                    GROUPS[rng.random_range(0..GROUPS.len())],
                    f64::from(rng.random_range(0..150)),
                )
            })
            .collect()
    }

    /// The rule, eagerly: per (unit, group) the C smallest (hash, value) rows, per unit
    /// the L0 groups with the smallest SHA-256.
    fn eager(rule: &Rule, rows: &[Row]) -> Totals {
        let conv = layout();
        let b = batch(rows);
        let units = conv
            .units
            .convert_columns(&[Arc::clone(b.column(0))])
            .unwrap();
        let keys = conv
            .keys
            .convert_columns(&[Arc::clone(b.column(1))])
            .unwrap();
        type Ranked = Vec<(u64, Vec<Option<i64>>)>;
        let mut cells: HashMap<(Vec<u8>, Vec<u8>), Ranked> = HashMap::new();
        for (r, row) in rows.iter().enumerate() {
            if row.0 < 0 {
                continue; // a row without a unit is dropped
            }
            let v = fixed_values(row.2);
            let (u, k) = (
                units.row(r).as_ref().to_vec(),
                keys.row(r).as_ref().to_vec(),
            );
            let h = row_hash(&rule.seed, &u, &k, &v);
            cells.entry((u, k)).or_default().push((h, v));
        }
        type Groups = Vec<([u8; 32], Vec<u8>, i128, Vec<i128>)>;
        let mut by_unit: HashMap<Vec<u8>, Groups> = HashMap::new();
        for ((u, k), mut rs) in cells {
            rs.sort();
            rs.truncate(rule.c);
            let sum = (0..CLAMP.len())
                .map(|i| rs.iter().filter_map(|(_, v)| v[i]).map(i128::from).sum())
                .collect();
            let g = group_hash(&rule.seed, &u, &k);
            by_unit
                .entry(u)
                .or_default()
                .push((g, k, rs.len() as i128, sum));
        }
        let mut totals = Totals::new();
        for (_, mut gs) in by_unit {
            gs.sort();
            gs.truncate(rule.l0);
            for (_, k, rows, sum) in gs {
                let t = totals
                    .entry(k.into())
                    .or_insert((0, 0, vec![0; CLAMP.len()]));
                t.0 += 1;
                t.1 += rows;
                for (t, s) in t.2.iter_mut().zip(sum) {
                    *t += s;
                }
            }
        }
        totals
    }

    #[test]
    fn scattered_keeps_what_the_rule_keeps() {
        let mut rng = rand::rng();
        for _ in 0..20 {
            let rows = random_rows(3_000);
            let rule = rule(3, 5);
            let mut acc = Scattered::new(layout(), rule.clone());
            for chunk in rows.chunks(rng.random_range(1..500)) {
                acc.add(&batch(chunk)).unwrap();
            }
            assert_eq!(acc.finish().unwrap(), eager(&rule, &rows));
        }
    }

    /// Rows sorted by unit, cut into partitions anywhere (inside a unit too, and into
    /// empty partitions), the partitions read in any order: the same totals.
    #[test]
    fn runs_keep_what_the_rule_keeps() {
        runs_match_the_rule();
    }

    #[test]
    fn runs_keep_what_the_rule_keeps_for_units_of_any_type() {
        STRING_UNITS.set(true);
        runs_match_the_rule();
    }

    fn runs_match_the_rule() {
        let mut rng = rand::rng();
        let (mut whole, mut kept) = (0, 0);
        for _ in 0..80 {
            // Long units (cut by the bounds) or short ones (most of them whole in a
            // batch and within the bounds: added directly).
            let n = rng.random_range(0..3_000);
            let units = [40, n / 3 + 1, n + 1][rng.random_range(0..3)] as i64;
            let mut rows = random_rows_of(n, units);
            rows.sort_by_key(|r| r.0);
            // Rows without a unit, anywhere (inside runs of one unit too).
            for _ in 0..n / 20 {
                let at = rng.random_range(0..=rows.len());
                rows.insert(at, (-1, GROUPS[rng.random_range(0..GROUPS.len())], 7.0));
            }
            let rule = rule(rng.random_range(1..7), rng.random_range(1..8));
            let mut cuts: Vec<usize> = (0..rng.random_range(0..4))
                .map(|_| rng.random_range(0..=rows.len()))
                .collect();
            cuts.extend([0, rows.len()]);
            cuts.sort();
            let mut parts: Vec<RunsEnd> = cuts
                .windows(2)
                .map(|w| {
                    let mut runs = Runs::new(layout(), rule.clone());
                    let part = &rows[w[0]..w[1]];
                    for chunk in part.chunks(rng.random_range(1..300)) {
                        assert!(runs.add(&batch(chunk)).unwrap());
                    }
                    whole += runs.added_whole;
                    kept += runs.kept;
                    runs.finish().unwrap()
                })
                .collect();
            parts.reverse();
            let totals = combine(parts, layout(), rule.clone()).unwrap();
            assert_eq!(totals, Some(eager(&rule, &rows)));
        }
        // Both ways of adding a unit were taken.
        assert!(whole > 0 && kept > 0, "whole {whole}, kept {kept}");
    }

    #[test]
    fn runs_give_up_on_rows_out_of_order() {
        let mut runs = Runs::new(layout(), rule(2, 2));
        assert!(
            runs.add(&batch(&[(1, "a", 1.0), (1, "b", 1.0), (3, "a", 1.0)]))
                .unwrap()
        );
        assert!(!runs.add(&batch(&[(2, "a", 1.0)])).unwrap());
        // Each partition in order, but one's units fall inside the other's range.
        let part = |rows: &[Row]| {
            let mut runs = Runs::new(layout(), rule(2, 2));
            assert!(runs.add(&batch(rows)).unwrap());
            runs.finish().unwrap()
        };
        let parts = vec![
            part(&[(1, "a", 1.0), (5, "a", 1.0), (9, "a", 1.0)]),
            part(&[(5, "b", 1.0)]),
        ];
        assert_eq!(combine(parts, layout(), rule(2, 2)).unwrap(), None);
    }

    #[test]
    fn ranges_fit_only_end_to_end() {
        let r = |a: u8, b: u8| Some((Box::from([a]), Box::from([b])));
        let cases: &[(&[Option<Range>], bool, &str)] = &[
            (&[r(1, 3), r(5, 9)], true, "apart"),
            (&[r(5, 9), r(1, 3)], true, "apart, either order"),
            (
                &[r(1, 5), r(5, 9)],
                true,
                "one unit at the end of one and the start of the next",
            ),
            (
                &[r(1, 5), r(5, 5), r(5, 9)],
                true,
                "a partition of that unit alone between them",
            ),
            (&[r(5, 5), r(5, 5)], true, "the same single unit twice"),
            (&[r(1, 5), None, r(6, 9)], true, "an empty partition"),
            (&[r(1, 5), r(4, 9)], false, "overlapping"),
            (
                &[r(3, 8), r(5, 5)],
                false,
                "a unit inside another partition's range",
            ),
            (&[r(1, 9), r(1, 9)], false, "the same range twice"),
        ];
        for (ranges, fits, why) in cases {
            assert_eq!(ranges_fit(ranges), *fits, "{why}");
        }
    }

    #[test]
    fn values_become_fixed_point_exactly() {
        use datafusion::arrow::array::{Decimal128Array, Float64Array, Int32Array};
        let wide = (i64::MIN, i64::MAX);
        let fixed_of = |a: ArrayRef, clamp| fixed(&a, clamp).unwrap().iter().collect::<Vec<_>>();
        let dec = |v: Vec<Option<i128>>, p, s| -> ArrayRef {
            Arc::new(
                Decimal128Array::from(v)
                    .with_precision_and_scale(p, s)
                    .unwrap(),
            )
        };
        // Scale 2 (TPC-H's prices): exact, ×10.
        assert_eq!(
            fixed_of(dec(vec![Some(12_345), Some(-1), None], 15, 2), wide),
            vec![Some(123_450), Some(-10), None]
        );
        // Scale 5: rounded half away from zero.
        assert_eq!(
            fixed_of(
                dec(
                    vec![Some(1_234_550), Some(-1_234_550), Some(1_234_549)],
                    15,
                    5
                ),
                wide
            ),
            vec![Some(12_346), Some(-12_346), Some(12_345)]
        );
        // Negative scale: 7 × 10² = 700.
        assert_eq!(
            fixed_of(dec(vec![Some(7)], 10, -2), wide),
            vec![Some(700_000)]
        );
        // Past the i64 range: saturated, then clamped.
        assert_eq!(
            fixed_of(
                dec(vec![Some(i128::MAX / 10), Some(i128::MIN / 10)], 38, 0),
                (-5, 5)
            ),
            vec![Some(5), Some(-5)]
        );
        assert_eq!(
            fixed_of(
                Arc::new(Int32Array::from(vec![Some(3), Some(-200), None])),
                (-100_000, 100_000)
            ),
            vec![Some(3_000), Some(-100_000), None]
        );
        assert_eq!(
            fixed_of(
                Arc::new(Float64Array::from(vec![
                    Some(1.2346),
                    Some(f64::NAN),
                    Some(f64::INFINITY)
                ])),
                (-10, 10_000)
            ),
            vec![Some(1_235), Some(-10), Some(10_000)]
        );
    }

    /// Totals of rows (unit, key column, value 1.0) read by [`Runs`] in two partitions,
    /// and by [`Scattered`].
    fn both_paths(units: Vec<i64>, key: ArrayRef) -> (Totals, Totals) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("unit", DataType::Int64, true),
            Field::new("key", key.data_type().clone(), true),
            Field::new("v", DataType::Float64, true),
        ]));
        let n = units.len();
        let b = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from(units)),
                key,
                Arc::new(Float64Array::from(vec![1.0; n])),
            ],
        )
        .unwrap();
        let rule = Rule {
            clamp: vec![CLAMP[0]],
            ..rule(2, 2)
        };
        let layout = || Layout::new(&schema, 1).unwrap();
        let parts = [b.slice(0, n / 2), b.slice(n / 2, n - n / 2)]
            .iter()
            .map(|p| {
                let mut runs = Runs::new(layout(), rule.clone());
                assert!(runs.add(p).unwrap());
                runs.finish().unwrap()
            })
            .collect();
        let runs = combine(parts, layout(), rule.clone()).unwrap().unwrap();
        let mut scattered = Scattered::new(layout(), rule);
        scattered.add(&b).unwrap();
        (runs, scattered.finish().unwrap())
    }

    /// A dictionary-encoded key (an upload from pandas) reaches the ends of partitions
    /// as row bytes and is looked up as such: no error, the same totals either way.
    #[test]
    fn dictionary_keys_cross_partitions() {
        use datafusion::arrow::array::DictionaryArray;
        use datafusion::arrow::datatypes::Int32Type;
        let key: DictionaryArray<Int32Type> =
            vec!["a", "b", "a", "a", "b", "b"].into_iter().collect();
        let (runs, scattered) = both_paths(vec![1, 1, 2, 2, 2, 3], Arc::new(key));
        assert_eq!(runs, scattered);
        assert_eq!(runs.len(), 2);
    }

    /// -0.0 and 0.0 are one group, named by the same bytes whichever row comes first.
    #[test]
    fn signed_zero_keys_are_one_group_in_any_order() {
        let keys = |v: Vec<f64>| -> ArrayRef { Arc::new(Float64Array::from(v)) };
        let (a, a2) = both_paths(vec![1, 2, 3, 4], keys(vec![-0.0, 0.0, -0.0, 0.0]));
        let (b, b2) = both_paths(vec![1, 2, 3, 4], keys(vec![0.0, -0.0, 0.0, -0.0]));
        assert_eq!(a, a2);
        assert_eq!(a, b);
        assert_eq!(b, b2);
        assert_eq!(a.len(), 1, "{a:?}");
    }
}
