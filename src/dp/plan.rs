//! The accounting of one DP query: how ε is split over its noisy measurements, each
//! measurement's sensitivity and noise scale, the selection threshold τ, and the 95%
//! half-widths reported with every noisy figure.
//!
//! A unit adds or removes at most L0 groups, at most C rows in each, each value
//! clamped to `[lo, hi]`, so the L1 sensitivities over all groups are:
//! distinct units `L0`, rows `L0·C`, a sum `L0·C·max(|lo|, |hi|)` (in fixed point).
//! ε is split equally over the measurements (basic composition); the noisy unit count
//! is always one of them (it selects the groups). δ pays for selection only: a group
//! whose key exists for one unit alone is released when `1 + Z >= τ`, and
//! `τ = 2 + k` where `k` is the smallest integer with `P(Z >= k + 1) <= δ / L0`
//! (a unit makes at most L0 such groups: union bound).

use super::noise;
use crate::policy::dp::{DpPolicy, FIXED_SCALE};

/// One noisy figure computed per group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub enum Measure {
    /// Distinct privacy units (selection, COUNT(DISTINCT unit)).
    Units,
    /// Rows (COUNT(*), AVG's denominator).
    Rows,
    /// The clamped sum of a column (SUM, AVG's numerator), index into the value columns.
    Sum(usize),
}

/// The noise of one measurement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct Noise {
    pub measure: Measure,
    /// L1 sensitivity, in the measurement's units (fixed point for sums).
    pub sensitivity: u128,
    /// ε of this measurement, in millionths.
    pub epsilon_micros: u128,
    /// Rational scale num/den of the discrete Laplace noise.
    pub scale: (u128, u128),
}

impl Noise {
    /// The scale as a float, in the measurement's units (reporting only).
    pub fn scale_f64(&self) -> f64 {
        self.scale.0 as f64 / self.scale.1 as f64
    }

    /// The half-width of the central interval missing `miss` of the noise, in the
    /// measurement's own units (unscaled from fixed point for sums).
    pub fn half_width(&self, miss: f64) -> f64 {
        let k = noise::half_width(self.scale_f64(), miss) as f64;
        match self.measure {
            Measure::Sum(_) => k / FIXED_SCALE as f64,
            _ => k,
        }
    }
}

/// The whole accounting of one query.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct Accounting {
    pub epsilon_micros: u128,
    /// δ, in 1e-12 units (what the ledger charges).
    pub delta_units: u64,
    pub l0: u64,
    pub c: u64,
    pub noises: Vec<Noise>,
    /// Group keys are released when the noisy unit count reaches τ (None: a global
    /// aggregate, always one row, no key to protect).
    pub tau: Option<i128>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("ε = {0} is above this table's maximum of {1} per query")]
    EpsilonAboveMax(f64, f64),
    #[error("ε must be positive")]
    EpsilonNotPositive,
    #[error("the noise scale overflows; lower the bounds or raise ε")]
    Overflow,
}

impl Accounting {
    /// Splits `epsilon` over the measurements (`Units` first, then `others` in order,
    /// duplicates removed). `bounds` gives each summed column's fixed-point bounds.
    pub fn new(
        policy: &DpPolicy,
        epsilon: f64,
        others: &[Measure],
        bounds: &[(i64, i64)],
        grouped: bool,
    ) -> Result<Self, Error> {
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(Error::EpsilonNotPositive);
        }
        // A tolerance of one millionth: ε is used in millionths anyway.
        if epsilon > policy.max_epsilon.0 + 1e-9 {
            return Err(Error::EpsilonAboveMax(epsilon, policy.max_epsilon.0));
        }
        let eps = noise::epsilon_micros(epsilon);
        let mut measures = vec![Measure::Units];
        for m in others {
            if !measures.contains(m) {
                measures.push(m.clone());
            }
        }
        let each = eps / measures.len() as u128;
        if each == 0 {
            return Err(Error::EpsilonNotPositive);
        }
        let (l0, c) = (
            policy.max_groups_per_unit as u128,
            policy.max_rows_per_group_per_unit as u128,
        );
        let noises = measures
            .into_iter()
            .map(|m| {
                let sensitivity = match &m {
                    Measure::Units => Some(l0),
                    Measure::Rows => l0.checked_mul(c),
                    Measure::Sum(i) => {
                        let (lo, hi) = bounds.get(*i).copied().unwrap_or((0, 0));
                        let m = lo.unsigned_abs().max(hi.unsigned_abs()) as u128;
                        l0.checked_mul(c).and_then(|x| x.checked_mul(m.max(1)))
                    }
                }
                .ok_or(Error::Overflow)?;
                let scale = noise::scale(sensitivity, each).ok_or(Error::Overflow)?;
                Ok(Noise {
                    measure: m,
                    sensitivity,
                    epsilon_micros: each,
                    scale,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let delta = policy.delta.0;
        let tau = grouped.then(|| {
            let b = noises[0].scale_f64();
            2 + noise::tail_k(b, delta / policy.max_groups_per_unit as f64) as i128
        });
        Ok(Self {
            epsilon_micros: each * noises.len() as u128,
            delta_units: if grouped {
                (delta * crate::approval::budget::DELTA_UNITS).ceil() as u64
            } else {
                0
            },
            l0: policy.max_groups_per_unit,
            c: policy.max_rows_per_group_per_unit,
            noises,
            tau,
        })
    }

    /// The noise of a measurement.
    pub fn noise(&self, m: &Measure) -> Option<(usize, &Noise)> {
        self.noises
            .iter()
            .enumerate()
            .find(|(_, n)| &n.measure == m)
    }

    /// ε actually spent (what is charged), as a float.
    pub fn epsilon(&self) -> f64 {
        self.epsilon_micros as f64 / 1e6
    }

    /// A human summary for `--explain` (no data, no counts).
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .noises
            .iter()
            .map(|n| {
                format!(
                    "{:?}: sensitivity {} ε {} scale {:.3} ci95 ±{:.3}",
                    n.measure,
                    n.sensitivity,
                    n.epsilon_micros as f64 / 1e6,
                    n.scale_f64(),
                    n.half_width(0.05)
                )
            })
            .collect();
        format!(
            "ε={} δ={} L0={} C={} τ={} [{}]",
            self.epsilon(),
            self.delta_units as f64 / crate::approval::budget::DELTA_UNITS,
            self.l0,
            self.c,
            self.tau
                .map_or("none (global)".to_string(), |t| t.to_string()),
            parts.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::dp::Real;

    fn policy() -> DpPolicy {
        DpPolicy {
            max_groups_per_unit: 2,
            max_rows_per_group_per_unit: 3,
            bounds: Default::default(),
            max_epsilon: Real(1.0),
            delta: Real(1e-6),
            stored_in_unit_order: None,
        }
    }

    #[test]
    fn splits_and_sensitivities() {
        let a = Accounting::new(
            &policy(),
            1.0,
            &[Measure::Rows, Measure::Sum(0), Measure::Rows],
            &[(0, 200_000)],
            true,
        )
        .unwrap();
        assert_eq!(a.noises.len(), 3);
        assert_eq!(a.epsilon_micros, 999_999);
        assert_eq!(a.noises[0].sensitivity, 2);
        assert_eq!(a.noises[1].sensitivity, 6);
        assert_eq!(a.noises[2].sensitivity, 6 * 200_000);
        // τ: P(Z >= τ - 1) <= δ / L0 with scale 2 / (1/3) = 6.
        let tau = a.tau.unwrap();
        let alpha = (-1.0f64 / 6.0).exp();
        assert!(alpha.powi(tau as i32 - 1) / (1.0 + alpha) <= 1e-6 / 2.0);
        assert!(alpha.powi(tau as i32 - 2) / (1.0 + alpha) > 1e-6 / 2.0);
        assert!(matches!(
            Accounting::new(&policy(), 2.0, &[], &[], true),
            Err(Error::EpsilonAboveMax(..))
        ));
    }
}
