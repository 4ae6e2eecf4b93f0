//! # infer: running recurrent-depth models
//!
//! For now: next-token predictions at each recurrence depth and the reference-fixture checker.
//! Generation, KV-cache strategies and adaptive exit build on the same `model` steps.

pub mod adaptive;
pub mod depths;
pub mod exit;
pub mod fixture_report;
pub mod greedy;
pub mod sampling;
pub mod speculative;
pub mod strategy;
