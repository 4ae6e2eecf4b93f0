//! # train: small-scale training of recurrent-depth models
//!
//! Built on `model`'s steps: the paper's randomized depth ([`depth`]), its Adam variant
//! ([`optim`]), learning-rate schedules ([`schedule`]), global-norm clipping ([`clip`]) and one
//! optimizer step with gradient accumulation ([`step`]); the reasoning tasks: reversed-digit
//! addition ([`addition`]), k-hop variable chains ([`chains`]) and k-hop pointer chains
//! ([`pointers`]), the last two sharing their splits by hop count ([`hops`]), batched and scored by exact match
//! ([`batch`]), and text ([`text`]), behind one [`data`] interface; whole runs with metrics,
//! checkpoints and a Hugging Face export ([`run`]), one process per run directory
//! ([`run_lock`]), configured by TOML files ([`config_file`]) within ranges ([`limits`]) and
//! the machine's memory ([`memory`]);
//! fine-tuning from a model folder or hub name ([`finetune`]) on chat data ([`chat_data`]);
//! the training benchmark ([`bench`](mod@bench)).
//! The truncated-backprop forward pass is `model::Huginn::forward_truncated`, checked against
//! the reference's gradients.
//!
//! Read [`step`] first (one optimizer step at a drawn depth), then [`run`] (a whole run:
//! checkpoints, metrics, resuming) and [`data`] (what a task hands the step).

pub mod addition;
pub mod batch;
pub mod bench;
pub mod chains;
pub mod chat_data;
pub mod checkpoint;
pub mod clip;
pub mod config_file;
pub mod data;
pub mod depth;
pub mod finetune;
pub mod hops;
pub mod layout;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod monitor;
pub mod optim;
pub mod optim_update;
pub mod pointers;
pub mod rng;
pub mod run;
pub mod run_lock;
pub mod schedule;
pub mod step;
pub mod text;
