//! # infer: running recurrent-depth models
//!
//! Next-token predictions at each recurrence depth, generation (adaptive exit, the reference's
//! KV-cache strategies, warm starts, sampling, self-speculative decoding), text in and out
//! through a model folder's tokenizer and chat template (the `folder` crate), the
//! OpenAI-style server, and the reference-fixture checker, all on the same `model` steps.
//!
//! Read [`adaptive`] first (the decoding loop: one token's recurrence, exit check between
//! steps), then [`cache`] and [`strategy`] (where each step's keys and values go), [`sampling`]
//! and [`exit`]; [`serve`] puts the engine behind HTTP. Every user-set value is checked in
//! [`limits`] with the one error of [`range`].

pub mod adaptive;
pub mod bench;
pub mod cache;
pub mod cli;
pub mod continuous;
pub mod depths;
pub mod diffusion;
pub mod eval;
pub mod exit;
pub mod fixture_report;
pub mod greedy;
pub mod limits;
pub mod range;
pub mod sampling;
pub mod score;
pub mod serve;
pub mod speculative;
pub mod stop;
pub mod strategy;
pub mod text;
pub mod warm_start;
