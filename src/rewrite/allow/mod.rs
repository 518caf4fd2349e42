//! The allow-lists of PRIVACY.md §3.2 as data: what may stand below a release boundary.
//!
//! - [`operators`]: the plan nodes, and what each one is refused as.
//! - [`functions`]: the scalar functions, each with why it is total.
//! - [`casts`]: the casts that cannot fail, and those that keep a value's identity.
//! - [`aggregates`]: what an aggregate's argument may be.
//! - [`sizes`]: how much work one row may cost (pattern lengths, pads, concatenations).
//!
//! The checker ([`super::check`]) looks facts up here; it never searches for bad patterns.

pub mod aggregates;
pub mod casts;
pub mod functions;
pub mod operators;
pub mod sizes;
