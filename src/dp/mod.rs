//! Differential privacy (PRIVACY.md §5b): exact discrete noise and the accounting of
//! one DP query (ε split, sensitivities, τ, interval widths).

pub mod bound;
pub mod noise;
pub mod plan;
