//! # infer: running recurrent-depth models
//!
//! Next-token predictions at each recurrence depth, generation (adaptive exit, the reference's
//! KV-cache strategies, warm starts, sampling, self-speculative decoding), text in and out
//! through a model folder's tokenizer and chat template, and the reference-fixture checker,
//! all on the same `model` steps.

pub mod adaptive;
pub mod bench;
pub mod cache;
pub mod chat;
pub mod cli;
pub mod depths;
pub mod diffusion;
pub mod exit;
pub mod fixture_report;
pub mod folder;
pub mod generation_config;
pub mod greedy;
pub mod hub;
pub mod limits;
pub mod sampling;
pub mod serve;
pub mod speculative;
pub mod stop;
pub mod strategy;
pub mod text;
pub mod warm_start;
