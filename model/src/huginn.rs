//! The recurrent-depth model (Geiping et al. 2025, "Huginn"): a prelude embeds the tokens into
//! `e`, a core block is iterated `r` times on a latent state with `e` injected at every step,
//! and a coda maps the final state to logits through the tied embedding.
//!
//! ```text
//! e   = prelude(wte[x] · √h)
//! s_0 = zeros | given | like-init(seed)
//! s_i = core(adapter([s_{i-1}, e]))          for i = 1..r
//! p   = wte · ln_f(coda(ln_f(s_r)))
//! ```
//!
//! The recurrence loop exists once, in [`Huginn::recur`]. Everything that iterates the model
//! (inference with early exit, truncated-backprop training, latent-trajectory analysis) drives
//! the small public steps: [`Huginn::embed_prelude`], [`Huginn::initial_state`],
//! [`Huginn::core_step`] / [`Huginn::recur`], and [`Huginn::coda_head`]; their `*_rows` forms
//! run the same steps for independent sequences, each at its own position and iteration.

use std::ops::Range;
use std::sync::OnceLock;

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::module::embedding;
use burn::tensor::{Distribution, FloatDType};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::attention::RowPass;
use crate::block::SandwichBlock;
use crate::cache::{KvCache, LayerSlot, NoCache};
use crate::config::HuginnConfig;
use crate::error::InputError;
use crate::init::truncated_normal;
use crate::norm::RmsNorm;
use crate::probe;
use crate::rope::Rotary;

#[derive(Module, Debug)]
pub struct Huginn {
    /// Token embedding `[V, h]`, also the output head (tied).
    pub wte: Param<Tensor<2>>,
    pub prelude: Vec<SandwichBlock>,
    /// Injection: `[2h, h]`; input rows `0..h` act on the state, `h..2h` on `e`.
    pub adapter: Linear,
    pub core_block: Vec<SandwichBlock>,
    pub coda: Vec<SandwichBlock>,
    /// Used twice: on the final latent state and after the coda.
    pub ln_f: RmsNorm,
    #[module(skip)]
    pub config: HuginnConfig,
    /// The rotation of every position of the context, computed at its first use (see
    /// [`Huginn::rotary`]).
    #[module(skip)]
    pub(crate) rotations: OnceLock<Rotary>,
}

/// The most memory the table of rotations ([`Huginn::rotary`]) takes: its cosines and sines in
/// f32 for at most this many bytes' worth of positions (Huginn-0125's context of 4,096 takes 3
/// MiB); positions beyond it, which only configurations of a vast context reach, are computed
/// when asked for.
const ROTATION_TABLE_BYTES: usize = 32 << 20;

/// Where the latent state starts.
// Passed by reference and never stored in bulk, so the tensor variant's size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum InitialState {
    /// `s_0 = 0` (the reference's `init_scale = 0`): deterministic.
    Zeros,
    /// An explicit `[B, S, h]` state (e.g. a warm start from the previous token).
    Given(Tensor<3>),
    /// The reference's "like-init": truncated normal with std `√(2/(5h))·scale` at ±3 std,
    /// times `√h`; drawn from a seeded generator so runs are reproducible on every device.
    LikeInit { seed: u64, scale: f64 },
}

/// The result of a plain forward pass.
#[derive(Debug, Clone)]
pub struct Forward {
    /// `[B, S, V]` in f32.
    pub logits: Tensor<3>,
    /// `ln_f(s_r)`: the normalised final state (what the reference returns as `latent_states`).
    pub latent: Tensor<3>,
    /// `s_r`: the raw final state (what the next iteration and a warm start take).
    pub state: Tensor<3>,
}

impl HuginnConfig {
    /// A freshly initialised model with the training code's "takase" scheme: truncated normals
    /// (±3σ), `σ = √(2/(5h))` for embedding, `Wqkv`, `mlp.fc` (both halves) and adapter,
    /// `σ/√(2·L)` for the output projections (`L` = effective expected depth); norms 1, q/k bias 0.
    ///
    /// Panics on an invalid configuration (a programming error: configurations read from files
    /// are validated when read).
    pub fn init(&self, device: &Device, seed: u64) -> Huginn {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.init_from(device, |shape, std| truncated_normal(shape, std, &mut rng, device))
    }

    /// Random weights of the same spreads drawn by the device itself (plain normals, not
    /// truncated, and not the same numbers on another device): for speed measurements at large
    /// shapes, where sampling Huginn-0125's 3.5 billion values on the host would take minutes.
    pub fn init_on_device(&self, device: &Device) -> Huginn {
        self.init_from(device, |shape, std| {
            Tensor::random(shape, Distribution::Normal(0.0, std), device)
        })
    }

    /// The model with every matrix drawn by `normal(shape, std)` (the takase spreads), norms 1
    /// and q/k bias 0.
    fn init_from(&self, device: &Device, mut normal: impl FnMut([usize; 2], f64) -> Tensor<2>) -> Huginn {
        self.validate().expect("init needs a valid config");
        let iv = self.init_values();
        let h = self.n_embd;
        let wte = normal([self.vocab_size, h], iv.embedding);
        let mut blocks = |count: usize| -> Vec<SandwichBlock> {
            (0..count)
                .map(|_| {
                    let wqkv = normal([h, 3 * h], iv.std);
                    let proj = normal([h, h], iv.out_proj);
                    let fc = normal([h, 2 * self.intermediate_size], iv.std);
                    let mlp_proj = normal([self.intermediate_size, h], iv.out_proj);
                    self.block_from(
                        wqkv,
                        Tensor::zeros([2, 1, self.n_heads, self.head_dim()], device),
                        proj,
                        fc,
                        mlp_proj,
                        |_| Tensor::ones([h], device),
                    )
                })
                .collect()
        };
        let prelude = blocks(self.n_layers_in_prelude);
        let core_block = blocks(self.n_layers_in_recurrent_block);
        let coda = blocks(self.n_layers_in_coda);
        let adapter = normal([2 * h, h], iv.std);
        Huginn {
            wte: Param::from_tensor(wte),
            prelude,
            adapter: linear(adapter),
            core_block,
            coda,
            ln_f: RmsNorm::new(Tensor::ones([h], device), self.norm_eps),
            config: self.clone(),
            rotations: OnceLock::new(),
        }
    }

    /// Assembles one block from its tensors (Burn layout: linears are `[in, out]`). `norm(i)`
    /// gives the weight of `norm_{i}`.
    pub(crate) fn block_from(
        &self,
        wqkv: Tensor<2>,
        qk_bias: Tensor<4>,
        proj: Tensor<2>,
        fc: Tensor<2>,
        mlp_proj: Tensor<2>,
        mut norm: impl FnMut(usize) -> Tensor<1>,
    ) -> SandwichBlock {
        use crate::attention::CausalSelfAttention;
        use crate::mlp::GatedMlp;
        let eps = self.norm_eps;
        SandwichBlock {
            norm_1: RmsNorm::new(norm(1), eps),
            attn: CausalSelfAttention {
                wqkv: linear(wqkv),
                qk_bias: Param::from_tensor(qk_bias),
                proj: linear(proj),
                n_heads: self.n_heads,
            },
            norm_2: RmsNorm::new(norm(2), eps),
            norm_3: RmsNorm::new(norm(3), eps),
            mlp: GatedMlp {
                fc: linear(fc),
                proj: linear(mlp_proj),
            },
            norm_4: RmsNorm::new(norm(4), eps),
        }
    }
}

/// A bias-free linear layer holding `weight` (`[in, out]`).
pub(crate) fn linear(weight: Tensor<2>) -> Linear {
    Linear {
        weight: Param::from_tensor(weight),
        bias: None,
    }
}

impl Huginn {
    pub fn config(&self) -> &HuginnConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.wte.val().device()
    }

    /// Checks host token ids (rows of equal length, ids in the vocabulary, within the context
    /// length) and puts them on the model's device as `[B, S]`.
    pub fn tokens(&self, rows: &[Vec<u32>]) -> Result<Tensor<2, Int>, InputError> {
        let len = rows.first().map_or(0, Vec::len);
        if len == 0 {
            return Err(InputError::Empty);
        }
        if let Some(bad) = rows.iter().find(|r| r.len() != len) {
            return Err(InputError::Ragged {
                first: len,
                other: bad.len(),
            });
        }
        if len > self.config.block_size {
            return Err(InputError::TooLong {
                len,
                context: self.config.block_size,
            });
        }
        let vocab = self.config.vocab_size;
        if let Some(&id) = rows.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(InputError::TokenOutOfRange { id, vocab });
        }
        let flat: Vec<i64> = rows.iter().flatten().map(|&id| id as i64).collect();
        Ok(Tensor::from_data(
            TensorData::new(flat, [rows.len(), len]),
            &self.device(),
        ))
    }

    /// Rotary positions `start..start + len` for the rows of a batch, aligned (one `[1, len, 1,
    /// d]` table that every row shares). Within the context, a window of a table of all its
    /// positions, computed once: a server's step takes each row's positions, a dozen tensor
    /// operations apiece when computed afresh.
    pub fn rotary(&self, start: usize, len: usize) -> Rotary {
        let device = self.device();
        let (head_dim, theta) = (self.config.head_dim(), self.config.rope_base);
        let covered = self
            .config
            .block_size
            .min(ROTATION_TABLE_BYTES / (2 * 4 * head_dim.max(1)));
        if start + len > covered {
            return Rotary::contiguous(start, 1, len, head_dim, theta, &device);
        }
        let table = self
            .rotations
            .get_or_init(|| Rotary::contiguous(0, 1, covered, head_dim, theta, &device));
        let made_on = table.device();
        if made_on != device || made_on.is_autodiff() != device.is_autodiff() {
            // A copy of the model on another device, or without autodiff (`valid()`), after
            // the table was made: a table of the other kind would mix the two in one pass.
            return Rotary::contiguous(start, 1, len, head_dim, theta, &device);
        }
        table.positions(start, len)
    }

    /// Rotary positions given per row, `[B, S]`.
    pub fn rotary_at(&self, positions: Tensor<2, Int>) -> Rotary {
        Rotary::new(positions, self.config.head_dim(), self.config.rope_base)
    }

    /// `wte[x] · √h`, the input of the prelude.
    pub fn embed(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        probe::stage("embedding");
        let x = embedding(self.wte.val(), tokens).mul_scalar(self.config.embed_scale());
        probe::note("scaled embedding", &x);
        x
    }

    /// Embedding followed by the prelude: the input injection `e`, `[B, S, h]`.
    pub fn embed_prelude(&self, tokens: Tensor<2, Int>, rotary: &Rotary, cache: &mut dyn KvCache) -> Tensor<3> {
        let mut x = self.embed(tokens);
        probe::stage("prelude");
        for (l, block) in self.prelude.iter().enumerate() {
            x = block.forward(x, rotary, LayerSlot::Prelude(l), cache);
        }
        x
    }

    /// The latent state the recurrence starts from, shaped like `e`.
    pub fn initial_state(&self, e: &Tensor<3>, init: &InitialState) -> Tensor<3> {
        let dims = e.dims();
        match init {
            InitialState::Zeros => Tensor::zeros(dims, (&e.device(), e.dtype())),
            InitialState::Given(s) => {
                assert_eq!(s.dims(), dims, "initial state must be shaped like e");
                s.clone()
            }
            InitialState::LikeInit { seed, scale } => {
                let std = self.config.init_values().std * scale;
                let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                let [b, s, h] = dims;
                truncated_normal([b * s, h], std, &mut rng, &e.device())
                    .reshape(dims)
                    .mul_scalar(self.config.embed_scale())
                    .cast(FloatDType::from(e.dtype()))
            }
        }
    }

    /// One recurrence step: `s' = core(adapter([s, e]))`. `iteration` (0-based) names the
    /// cache slots this step writes.
    pub fn core_step(
        &self,
        state: Tensor<3>,
        e: &Tensor<3>,
        iteration: usize,
        rotary: &Rotary,
        cache: &mut dyn KvCache,
    ) -> Tensor<3> {
        probe::stage("core");
        let mut x = crate::kernels::linear::linear(&self.adapter, Tensor::cat(vec![state, e.clone()], 2));
        probe::note("adapter output", &x);
        for (layer, block) in self.core_block.iter().enumerate() {
            x = block.forward(x, rotary, LayerSlot::Core { iteration, layer }, cache);
        }
        x
    }

    /// THE recurrence loop: runs the core for each iteration in `iterations` starting from
    /// `state`, calling `observe(i, &s_{i+1})` after each step, and returns the last state.
    pub fn recur(
        &self,
        e: &Tensor<3>,
        mut state: Tensor<3>,
        iterations: Range<usize>,
        rotary: &Rotary,
        cache: &mut dyn KvCache,
        mut observe: impl FnMut(usize, &Tensor<3>),
    ) -> Tensor<3> {
        for i in iterations {
            state = self.core_step(state, e, i, rotary, cache);
            observe(i, &state);
        }
        state
    }

    /// [`Self::embed_prelude`] for independent sequences stacked along the batch, each with its
    /// own positions and cache (see [`RowPass`]).
    pub fn embed_prelude_rows(&self, tokens: Tensor<2, Int>, rows: &mut [RowPass<'_>]) -> Tensor<3> {
        let mut x = self.embed(tokens);
        probe::stage("prelude");
        for (l, block) in self.prelude.iter().enumerate() {
            x = block.forward_rows(x, rows, |_| LayerSlot::Prelude(l));
        }
        x
    }

    /// [`Self::core_step`] for independent sequences stacked along the batch, row `b` at its
    /// own iteration `iterations[b]`: one pass over the core's weights for rows at any depth.
    pub fn core_step_rows(
        &self,
        state: Tensor<3>,
        e: &Tensor<3>,
        iterations: &[usize],
        rows: &mut [RowPass<'_>],
    ) -> Tensor<3> {
        assert_eq!(iterations.len(), rows.len(), "one iteration per row");
        probe::stage("core");
        let mut x = crate::kernels::linear::linear(&self.adapter, Tensor::cat(vec![state, e.clone()], 2));
        probe::note("adapter output", &x);
        for (layer, block) in self.core_block.iter().enumerate() {
            x = block.forward_rows(x, rows, |b| LayerSlot::Core {
                iteration: iterations[b],
                layer,
            });
        }
        x
    }

    /// [`Self::coda`] for independent sequences stacked along the batch.
    pub fn coda_rows(&self, state: Tensor<3>, rows: &mut [RowPass<'_>]) -> Tensor<3> {
        let mut x = self.latent(state);
        probe::stage("coda");
        for (l, block) in self.coda.iter().enumerate() {
            x = block.forward_rows(x, rows, |_| LayerSlot::Coda(l));
        }
        self.ln_f.forward(x)
    }

    /// `ln_f(s)`: the normalised latent state that enters the coda.
    pub fn latent(&self, state: Tensor<3>) -> Tensor<3> {
        self.ln_f.forward(state)
    }

    /// Coda and tied head from a RAW state: `wte · ln_f(coda(ln_f(s)))`, logits in f32.
    pub fn coda_head(&self, state: Tensor<3>, rotary: &Rotary, cache: &mut dyn KvCache) -> Tensor<3> {
        self.head(self.coda(state, rotary, cache))
    }

    /// The coda from a RAW state, `ln_f(coda(ln_f(s)))`: what the head reads. On its own for
    /// positions whose keys and values later positions need but whose logits nobody does.
    pub fn coda(&self, state: Tensor<3>, rotary: &Rotary, cache: &mut dyn KvCache) -> Tensor<3> {
        let mut x = self.latent(state);
        probe::stage("coda");
        for (l, block) in self.coda.iter().enumerate() {
            x = block.forward(x, rotary, LayerSlot::Coda(l), cache);
        }
        self.ln_f.forward(x)
    }

    /// The tied output head: `x · wteᵀ`, cast to f32.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        probe::stage("head");
        let logits = crate::kernels::linear::product(x, self.wte.val().transpose());
        probe::note("logits", &logits);
        logits.cast(FloatDType::F32)
    }

    /// A full forward pass from a zero state, no cache.
    pub fn forward(&self, tokens: Tensor<2, Int>, num_steps: usize) -> Forward {
        self.forward_with(tokens, num_steps, &InitialState::Zeros, 0, &mut NoCache, |_, _| {})
    }

    /// A full forward pass of a chunk starting at position `start`, through `cache`, from
    /// `init`, calling `observe` on every iteration's raw state.
    pub fn forward_with(
        &self,
        tokens: Tensor<2, Int>,
        num_steps: usize,
        init: &InitialState,
        start: usize,
        cache: &mut dyn KvCache,
        observe: impl FnMut(usize, &Tensor<3>),
    ) -> Forward {
        let [_, len] = tokens.dims();
        let rotary = self.rotary(start, len);
        let e = self.embed_prelude(tokens, &rotary, cache);
        let s0 = self.initial_state(&e, init);
        let state = self.recur(&e, s0, 0..num_steps, &rotary, cache, observe);
        let logits = self.coda_head(state.clone(), &rotary, cache);
        Forward {
            logits,
            latent: self.latent(state.clone()),
            state,
        }
    }
    /// The training forward pass (the reference's `num_steps = [n, k]`): `no_grad` iterations
    /// outside the autodiff graph, then `with_grad` iterations inside it (truncated backprop
    /// through depth). The prelude still receives gradient through the injection of `e` into
    /// every one of the last `with_grad` steps; the initial state never does.
    ///
    /// The first iterations run on a gradient-free view of the model, so they cost no graph
    /// memory at all (detaching alone would keep their graph alive until the next backward).
    pub fn forward_truncated(
        &self,
        tokens: Tensor<2, Int>,
        no_grad: usize,
        with_grad: usize,
        init: &InitialState,
    ) -> Forward {
        let [_, len] = tokens.dims();
        let rotary = self.rotary(0, len);
        let e = self.embed_prelude(tokens, &rotary, &mut NoCache);
        let s0 = self.initial_state(&e, init).detach();
        let state = if no_grad == 0 {
            s0
        } else {
            let frozen = self.valid();
            let plain = |t: Tensor<3>| t.without_autodiff();
            let s = frozen.recur(
                &plain(e.clone()),
                plain(s0),
                0..no_grad,
                &rotary.without_autodiff(),
                &mut NoCache,
                |_, _| {},
            );
            autodiff_like(s, &e)
        };
        let state = self.recur(
            &e,
            state,
            no_grad..no_grad + with_grad,
            &rotary,
            &mut NoCache,
            |_, _| {},
        );
        let logits = self.coda_head(state.clone(), &rotary, &mut NoCache);
        Forward {
            logits,
            latent: self.latent(state.clone()),
            state,
        }
    }
}

/// `t` in the same autodiff context as `like`: tracked with the same checkpointing strategy
/// when `like` is, plain otherwise.
fn autodiff_like(t: Tensor<3>, like: &Tensor<3>) -> Tensor<3> {
    match like.gradient_checkpointing_strategy() {
        Some(strategy) => t.autodiff().with_gradient_checkpointing_strategy(strategy),
        None => t,
    }
}
