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
//! * the same steps over independent sequences stacked along the batch, each with its own
//!   positions, cache and iteration ([`Huginn::core_step_rows`] and its siblings, [`RowPass`]):
//!   what a server runs for requests at different depths
//!
//! Weights come from the reference Hugging Face layout ([`Huginn::from_pretrained`]) or Burn's
//! own record format, and go back out to either. The backend is a runtime [`Device`]; see
//! [`Backend`] for the `--device` choice binaries offer.
//!
//! ## Where to read
//!
//! The definition is the top level: [`huginn`] (the model and its steps), then the layers it is
//! built from, [`block`], [`attention`], [`mlp`], [`norm`], [`rope`], and [`cache`] (how a layer
//! reads and writes its keys and values). [`config`], [`pretrained`], [`checkpoint`] and [`init`]
//! make and load a model; [`device`] picks the backend; [`error`] holds the typed errors;
//! [`fixture`] checks the model against the reference's recorded outputs; [`probe`] records
//! how far the activations of a pass go.
//!
//! [`kernels`] is the CPU engine: the same operations fused into one pass each on Burn's Flex
//! backend, each beside the composed version every other backend runs (the training loss,
//! [`cross_entropy`], is one of them). Changing the architecture starts at the top level;
//! making it faster on the CPU, or adding a kernel for another backend, in [`kernels`].
//!
//! [`Device`]: burn::prelude::Device

pub mod attention;
pub mod bandwidth;
pub mod block;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod fixture;
pub mod huginn;
pub mod init;
pub mod kernels;
pub mod mlp;
pub mod norm;
pub mod pause;
pub mod pretrained;
pub mod probe;
pub mod quantize;
pub mod rope;

pub use attention::RowPass;
pub use cache::{Attend, FullCache, KvCache, LayerSlot, NoCache};
pub use config::HuginnConfig;
pub use device::{Backend, DeviceError, DeviceSpec, Precision, peak_rss_bytes, rss_bytes};
pub use error::{ConfigError, InputError, WeightsError};
pub use huginn::{Forward, Huginn, InitialState};
pub use kernels::cross_entropy::cross_entropy;
pub use quantize::{Bits, Quantization};
pub use rope::Rotary;

/// Burn, re-exported so that dependants use exactly the model's version.
pub use burn;
