//! # model: the recurrent-depth transformer of Geiping et al. 2025 ("Huginn-0125")
//!
//! One backend-free definition of the model, exact against the authors' PyTorch reference,
//! that training, inference and analysis all drive through the same small steps
//! (see [`Huginn`]):
//!
//! * [`Huginn::embed_prelude`]: tokens → input injection `e`
//! * [`Huginn::initial_state`]: zeros, a given state, or the reference's seeded "like-init"
//! * [`Huginn::core_step`] / [`Huginn::recur`]: `s_i = core(adapter([s_{i-1}, e]))`
//! * [`Huginn::coda_head`]: raw state → logits
//!
//! Weights come from the reference Hugging Face layout ([`Huginn::from_pretrained`]) or Burn's
//! own record format, and go back out to either. The backend is a runtime [`Device`]; see
//! [`Backend`] for the `--device` choice binaries offer.
//!
//! [`Device`]: burn::prelude::Device

pub mod attention;
pub mod block;
pub mod cache;
pub mod cached_attention;
pub mod causal_attention;
pub mod checkpoint;
pub mod chunk_attention;
pub mod config;
pub mod device;
pub mod error;
pub mod fixture;
pub mod flex;
pub mod gate;
pub mod heap;
pub mod huginn;
pub mod init;
pub mod linear;
pub mod loss;
pub mod matmul;
pub mod mlp;
pub mod norm;
pub mod normalise;
pub mod pretrained;
pub mod rope;
pub mod simd;
pub mod threads;

pub use cache::{Attend, FullCache, KvCache, LayerSlot, NoCache};
pub use config::HuginnConfig;
pub use device::{Backend, DeviceError, DeviceSpec, Precision, peak_rss_bytes, rss_bytes};
pub use error::{ConfigError, InputError, WeightsError};
pub use huginn::{Forward, Huginn, InitialState, cross_entropy};
pub use rope::Rotary;

/// Burn, re-exported so that dependants use exactly the model's version.
pub use burn;
