//! What the model would predict from every iteration's state: the coda and head applied to
//! `s_i` ("coda lens"), summarised per position as the entropy of the next-token distribution,
//! its KL divergence from the previous iteration's, and the top-1 token with its probability;
//! plus how far the raw state itself still moves.

use model::burn::prelude::*;
use model::burn::tensor::activation::log_softmax;
use model::{Huginn, NoCache};

use crate::{host_f32, host_u32};

/// Per-iteration statistics of one capture, flattened row-major over `[iteration, position]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outputs {
    /// `[R+1, S]`: entropy of `p_i` in nats.
    pub entropy: Vec<f32>,
    /// `[R+1, S]`: the most likely next token under `p_i`.
    pub top1: Vec<u32>,
    /// `[R+1, S]`: its probability.
    pub top1_prob: Vec<f32>,
    /// `[R, S]`: row `j` is `KL(p_j ‖ p_{j+1})`, the direction of `infer`'s `kl` exit criterion
    /// (the earlier distribution is the reference).
    pub kl: Vec<f32>,
    /// `[R, S]`: row `j` is `‖s_{j+1} − s_j‖ / ‖s_{j+1}‖` on raw states (`infer`'s
    /// `latent-diff`, per position instead of averaged).
    pub residual: Vec<f32>,
}

/// The statistics of a batch of consecutive iterations, with what the next batch needs.
pub(crate) struct Readout {
    pub entropy: Vec<f32>,
    pub top1: Vec<u32>,
    pub top1_prob: Vec<f32>,
    pub kl: Vec<f32>,
    pub residual: Vec<f32>,
    /// `[1, S, V]`: log-probabilities of the batch's last iteration.
    pub last_logp: Tensor<3>,
}

/// Reads out `states` (`[k, S, h]` raw states of `k` consecutive iterations of one prompt; each
/// row of the batch is one iteration, run through the coda as a separate sequence), given the
/// iteration before them when there is one (its raw state and log-probabilities). KL and
/// residual rows are produced only for iterations that have a predecessor.
pub(crate) fn read_out(model: &Huginn, states: Tensor<3>, before: Option<(Tensor<3>, Tensor<3>)>) -> Readout {
    let [k, len, _] = states.dims();
    let rotary = model.rotary(0, len);
    let logp = log_softmax(model.coda_head(states.clone(), &rotary, &mut NoCache), 2);
    let entropy = logp.clone().exp().mul(logp.clone()).sum_dim(2).neg();
    let (best, top1) = logp.clone().max_dim_with_indices(2);
    // (previous, current) states and log-probabilities of every iteration with a predecessor.
    let pairs = match before {
        Some((state, lp)) if k == 1 => Some((state, lp, states, logp.clone())),
        Some((state, lp)) => Some((
            Tensor::cat(vec![state, states.clone().narrow(0, 0, k - 1)], 0),
            Tensor::cat(vec![lp, logp.clone().narrow(0, 0, k - 1)], 0),
            states,
            logp.clone(),
        )),
        None if k > 1 => Some((
            states.clone().narrow(0, 0, k - 1),
            logp.clone().narrow(0, 0, k - 1),
            states.narrow(0, 1, k - 1),
            logp.clone().narrow(0, 1, k - 1),
        )),
        None => None,
    };
    let (kl, residual) = match pairs {
        Some((prev_states, prev_logp, cur_states, cur_logp)) => {
            let kl = prev_logp.clone().exp().mul(prev_logp - cur_logp).sum_dim(2);
            let norm = |t: Tensor<3>| t.square().sum_dim(2).sqrt();
            let residual = norm(cur_states.clone() - prev_states) / norm(cur_states);
            (host_f32(kl), host_f32(residual))
        }
        None => (Vec::new(), Vec::new()),
    };
    Readout {
        entropy: host_f32(entropy),
        top1: host_u32(top1),
        top1_prob: host_f32(best.exp()),
        kl,
        residual,
        last_logp: logp.narrow(0, k - 1, 1),
    }
}
