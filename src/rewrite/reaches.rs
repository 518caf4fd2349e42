//! `airlock_reaches_k(entity, k)`: how many distinct entities a group holds, counted only
//! up to k. The threshold rule (`threshold.rs`) asks it whether a group reaches k.
//!
//! The threshold needs to know whether a group holds at least k distinct entities, never
//! how many. An exact `count(DISTINCT entity)` keeps every entity of every group in a
//! hash set: for TPC-H q1 that is 1.5 M order keys in each of four groups, which cost more
//! than the query itself. This aggregate keeps at most k entity hashes per group and
//! stops looking once it has k, so it holds O(groups × k) and a group that reached k
//! costs one comparison per row.
//!
//! Entities are compared by a fixed-seed 64-bit hash of their value (any Arrow type;
//! NULL is no entity, as in `count(DISTINCT)`). A collision can only make two entities
//! count as one, so the count can only come out low: a group with k entities may, with
//! odds around k²/2⁶⁴, be withheld; a group with fewer than k can never be released.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, ListArray, UInt64Array,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, UInt64Type};
use datafusion::common::hash_utils::{HLL_RANDOM_STATE, create_hashes};
use datafusion::common::{ScalarValue, exec_err};
use datafusion::error::Result;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, Expr, GroupsAccumulator, Signature,
    Volatility, lit,
};
use datafusion::physical_expr::expressions::Literal;

/// The aggregate's name, as the verifier looks for it.
pub const NAME: &str = "airlock_reaches_k";

/// `airlock_reaches_k(entity, k)`. k is the second argument, a literal: the function
/// is the same for every k, so a worker of a cluster (`crate::cluster`), which finds
/// functions by name, counts to the k the front end planned.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ReachesK {
    signature: Signature,
}

impl Default for ReachesK {
    fn default() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

/// The aggregate, for a session's (or a worker's) function registry.
pub fn udaf() -> AggregateUDF {
    AggregateUDF::new_from_impl(ReachesK::default())
}

/// `min(count(DISTINCT entity), k)` over `entity`.
pub fn reaches_k(entity: Expr, k: u64) -> Expr {
    let k = i64::try_from(k).unwrap_or(i64::MAX).max(1);
    udaf().call(vec![entity, lit(k)])
}

/// The k of a call: its second argument, a positive integer literal. Anything else
/// fails the query rather than count to some other k.
fn k_of(args: &AccumulatorArgs) -> Result<usize> {
    let k = args
        .exprs
        .get(1)
        .and_then(|e| e.downcast_ref::<Literal>())
        .and_then(|l| match l.value() {
            ScalarValue::Int64(Some(k)) => usize::try_from(*k).ok().filter(|k| *k >= 1),
            _ => None,
        });
    match k {
        Some(k) => Ok(k),
        None => exec_err!("{NAME}: k must be a positive integer literal"),
    }
}

impl AggregateUDFImpl for ReachesK {
    fn name(&self) -> &str {
        NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn default_value(&self, _data_type: &DataType) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(0)))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}_hashes", args.name),
            hashes_type(),
            true,
        ))])
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(One {
            seen: Seen::default(),
            k: k_of(&args)?,
        }))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(Groups {
            groups: Vec::new(),
            k: k_of(&args)?,
            hashes: Vec::new(),
        }))
    }
}

fn hashes_type() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::UInt64, true)))
}

/// The distinct hashes of one group, at most k of them.
#[derive(Debug, Default, Clone)]
struct Seen(Vec<u64>);

impl Seen {
    #[inline]
    fn insert(&mut self, hash: u64, k: usize) {
        if self.0.len() < k && !self.0.contains(&hash) {
            self.0.push(hash);
        }
    }

    fn count(&self) -> i64 {
        self.0.len() as i64
    }
}

/// Hashes of `values` (one array), with `None` for NULLs.
fn hash_rows(values: &ArrayRef, buffer: &mut Vec<u64>) -> Result<()> {
    buffer.clear();
    buffer.resize(values.len(), 0);
    create_hashes([values], &HLL_RANDOM_STATE, buffer)?;
    Ok(())
}

/// Per-group state as a list array of hashes (for the two-phase aggregation's merge).
fn to_list(groups: impl Iterator<Item = Seen>) -> ArrayRef {
    let mut offsets = vec![0i32];
    let mut values = Vec::new();
    for g in groups {
        values.extend_from_slice(&g.0);
        offsets.push(values.len() as i32);
    }
    Arc::new(ListArray::new(
        Arc::new(Field::new_list_field(DataType::UInt64, true)),
        OffsetBuffer::new(offsets.into()),
        Arc::new(UInt64Array::from(values)),
        None,
    ))
}

fn list_hashes(state: &ArrayRef) -> Result<(&ListArray, &UInt64Array)> {
    let Some(list) = state.as_list_opt::<i32>() else {
        return exec_err!("airlock_reaches_k: state is not a list");
    };
    let Some(values) = list.values().as_primitive_opt::<UInt64Type>() else {
        return exec_err!("airlock_reaches_k: state is not a list of hashes");
    };
    Ok((list, values))
}

/// The grouped form: one [`Seen`] per group index.
struct Groups {
    groups: Vec<Seen>,
    k: usize,
    hashes: Vec<u64>,
}

impl GroupsAccumulator for Groups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.groups.resize_with(total_num_groups, Seen::default);
        let k = self.k;
        // Most batches only touch groups that reached k long ago: skip hashing them.
        if group_indices.iter().all(|&g| self.groups[g].0.len() >= k) {
            return Ok(());
        }
        let values = &values[0];
        hash_rows(values, &mut self.hashes)?;
        for (row, &g) in group_indices.iter().enumerate() {
            let seen = &mut self.groups[g];
            if seen.0.len() >= k
                || values.is_null(row)
                || opt_filter.is_some_and(|f| !f.is_valid(row) || !f.value(row))
            {
                continue;
            }
            seen.insert(self.hashes[row], k);
        }
        Ok(())
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.groups.resize_with(total_num_groups, Seen::default);
        let (list, hashes) = list_hashes(&values[0])?;
        let offsets = list.value_offsets();
        for (row, &g) in group_indices.iter().enumerate() {
            if list.is_null(row) {
                continue;
            }
            let seen = &mut self.groups[g];
            for i in offsets[row] as usize..offsets[row + 1] as usize {
                seen.insert(hashes.value(i), self.k);
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let taken = emit_to.take_needed(&mut self.groups);
        Ok(Arc::new(Int64Array::from_iter_values(
            taken.iter().map(Seen::count),
        )))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let taken = emit_to.take_needed(&mut self.groups);
        Ok(vec![to_list(taken.into_iter())])
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let values = &values[0];
        let mut hashes = Vec::new();
        hash_rows(values, &mut hashes)?;
        let rows = (0..values.len()).map(|row| {
            let counted =
                !values.is_null(row) && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row));
            Seen(if counted { vec![hashes[row]] } else { vec![] })
        });
        Ok(vec![to_list(rows)])
    }

    fn size(&self) -> usize {
        self.groups.capacity() * std::mem::size_of::<Seen>()
            + self
                .groups
                .iter()
                .map(|g| g.0.capacity() * 8)
                .sum::<usize>()
            + self.hashes.capacity() * 8
    }
}

/// The ungrouped form (a global aggregate).
#[derive(Debug)]
struct One {
    seen: Seen,
    k: usize,
}

impl Accumulator for One {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        if self.seen.0.len() >= self.k {
            return Ok(());
        }
        let values = &values[0];
        let mut hashes = Vec::new();
        hash_rows(values, &mut hashes)?;
        for (row, hash) in hashes.into_iter().enumerate() {
            if self.seen.0.len() >= self.k {
                break;
            }
            if !values.is_null(row) {
                self.seen.insert(hash, self.k);
            }
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let (list, hashes) = list_hashes(&states[0])?;
        for row in 0..list.len() {
            if list.is_null(row) {
                continue;
            }
            let offsets = list.value_offsets();
            for i in offsets[row] as usize..offsets[row + 1] as usize {
                self.seen.insert(hashes.value(i), self.k);
            }
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let list = to_list(std::iter::once(self.seen.clone()));
        Ok(vec![ScalarValue::List(Arc::new(
            list.as_list::<i32>().clone(),
        ))])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(self.seen.count())))
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.seen.0.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};

    fn groups(k: usize) -> Groups {
        Groups {
            groups: Vec::new(),
            k,
            hashes: Vec::new(),
        }
    }

    fn counts(acc: &mut Groups) -> Vec<i64> {
        let a = acc.evaluate(EmitTo::All).unwrap();
        a.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .values()
            .to_vec()
    }

    #[test]
    fn counts_distinct_entities_up_to_k_and_ignores_nulls() {
        let mut acc = groups(3);
        let values: ArrayRef = Arc::new(Int64Array::from(vec![
            Some(1),
            Some(1),
            None,
            Some(2),
            Some(7),
            Some(8),
            Some(9),
            Some(7),
        ]));
        acc.update_batch(&[values], &[0, 0, 0, 0, 1, 1, 1, 1], None, 2)
            .unwrap();
        assert_eq!(counts(&mut acc), vec![2, 3]);
    }

    #[test]
    fn partial_states_merge_without_double_counting() {
        let strings = |v: &[&str]| -> ArrayRef { Arc::new(StringArray::from(v.to_vec())) };
        let (mut left, mut right) = (groups(5), groups(5));
        left.update_batch(&[strings(&["a", "b", "c"])], &[0, 0, 0], None, 1)
            .unwrap();
        right
            .update_batch(&[strings(&["c", "d", "a"])], &[0, 0, 0], None, 1)
            .unwrap();
        let states = [
            left.state(EmitTo::All).unwrap(),
            right.state(EmitTo::All).unwrap(),
        ];
        let mut total = groups(5);
        for state in &states {
            total.merge_batch(state, &[0], 1).unwrap();
        }
        assert_eq!(counts(&mut total), vec![4]);
        // Rows converted straight to state merge the same way; the count stops at k.
        let mut capped = groups(5);
        for state in &states {
            capped.merge_batch(state, &[0], 1).unwrap();
        }
        let rows = capped
            .convert_to_state(&[strings(&["e", "a", "f"])], None)
            .unwrap();
        capped.merge_batch(&rows, &[0, 0, 0], 1).unwrap();
        assert_eq!(counts(&mut capped), vec![5]);
    }

    #[test]
    fn global_form_agrees() {
        let mut one = One {
            seen: Seen::default(),
            k: 10,
        };
        let values: ArrayRef = Arc::new(Int64Array::from(vec![Some(4), Some(4), None, Some(5)]));
        one.update_batch(&[values]).unwrap();
        let state = one.state().unwrap()[0].to_array().unwrap();
        let mut other = One {
            seen: Seen::default(),
            k: 10,
        };
        other.merge_batch(&[state]).unwrap();
        assert_eq!(other.evaluate().unwrap(), ScalarValue::Int64(Some(2)));
    }
}
