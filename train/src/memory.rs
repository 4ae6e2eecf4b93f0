//! The memory a run will hold, estimated from its shapes before anything is allocated and
//! checked against what the machine has available, so that a size the machine cannot hold is
//! one error ("needs 37.2 GiB, this machine has 23.1 GiB available") rather than an allocation
//! abort, or a machine swapping, minutes later.
//!
//! The estimate is deliberately generous (f32 everywhere, every activation of the backprop
//! window kept, attention scores materialised): it is a bound for refusing what cannot fit,
//! not a prediction.

use model::HuginnConfig;

const F32: f64 = 4.0;
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "{what} needs {:.1} GiB, this machine has {:.1} GiB available",
    .needed / GIB,
    .available / GIB
)]
pub struct MemoryError {
    pub what: String,
    pub needed: f64,
    pub available: f64,
}

/// The shapes of a training run that decide its memory.
#[derive(Debug, Clone, Copy)]
pub struct Shapes<'a> {
    pub model: &'a HuginnConfig,
    /// Rows of a micro-batch and tokens of a row.
    pub batch_size: usize,
    pub seq_len: usize,
    /// Recurrence steps with gradient (the graph a step keeps).
    pub backprop: usize,
    /// Devices holding a replica and a micro-batch each.
    pub devices: usize,
    /// Rows and tokens of an evaluation split, run as one batch (0 rows: no evaluation).
    pub eval_rows: usize,
    pub eval_len: usize,
}

impl Shapes<'_> {
    /// Bytes of the weights, their gradients, the optimizer's two moments and the update's
    /// temporaries, and each further device's replica with its gradients.
    pub fn state_bytes(&self) -> f64 {
        let params = self.model.num_params() as f64;
        F32 * params * (5.0 + 2.0 * self.devices.saturating_sub(1) as f64)
    }

    /// Bytes of one forward and backward pass: per device, a micro-batch's activations of
    /// every layer the graph holds (prelude, coda and the core over the backprop window), and
    /// the logits with their softmax and gradient.
    pub fn step_bytes(&self) -> f64 {
        let m = self.model;
        let layers = (m.n_layers_in_prelude + m.n_layers_in_coda) as f64
            + (m.n_layers_in_recurrent_block * self.backprop.max(1)) as f64
            + 1.0;
        let tokens = self.batch_size as f64 * self.seq_len as f64;
        let per_token = layers * layer_floats(m, self.seq_len) + 3.0 * m.vocab_size as f64;
        F32 * tokens * per_token * self.devices.max(1) as f64
    }

    /// Bytes of evaluating a split: one layer's activations at a time, and the logits.
    pub fn eval_bytes(&self) -> f64 {
        let m = self.model;
        let tokens = self.eval_rows as f64 * self.eval_len as f64;
        F32 * tokens * (layer_floats(m, self.eval_len) + 2.0 * m.vocab_size as f64)
    }

    /// Bytes the run needs at its peak on the host: everything when the devices are the CPU,
    /// else the host's copies of the weights and optimizer state (checkpoints, the export).
    pub fn host_bytes(&self, on_host: bool) -> f64 {
        match on_host {
            true => self.state_bytes() + self.step_bytes().max(self.eval_bytes()),
            false => F32 * self.model.num_params() as f64 * 3.0,
        }
    }
}

/// Floats a layer keeps per token: its inputs, norms, q/k/v and output, the MLP's three
/// intermediate-wide tensors, and a row of attention scores per head.
fn layer_floats(m: &HuginnConfig, seq_len: usize) -> f64 {
    10.0 * m.n_embd as f64 + 3.0 * m.intermediate_size as f64 + 2.0 * (m.n_heads * seq_len) as f64
}

/// Memory the machine has available now (`MemAvailable` of `/proc/meminfo`); `None` where
/// that cannot be read, and then nothing is checked.
pub fn available_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// Refuses `needed` bytes for `what` when the machine has less available.
pub fn check(what: &str, needed: f64) -> Result<(), MemoryError> {
    match available_bytes() {
        Some(available) if needed > available => Err(MemoryError {
            what: what.to_string(),
            needed,
            available,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(model: &HuginnConfig, batch_size: usize) -> Shapes<'_> {
        Shapes {
            model,
            batch_size,
            seq_len: 64,
            backprop: 3,
            devices: 1,
            eval_rows: 256,
            eval_len: 64,
        }
    }

    #[test]
    fn a_small_run_fits_and_absurd_shapes_are_refused_with_both_sizes() {
        let small = HuginnConfig::tiny(32, 64, 4, (1, 2, 1));
        assert!(shapes(&small, 32).host_bytes(true) < 256.0 * 1024.0 * 1024.0);
        assert!(check("a run", shapes(&small, 32).host_bytes(true)).is_ok());
        let wide = HuginnConfig::tiny(32, 65536, 4, (1, 2, 1));
        for needed in [
            shapes(&wide, 1).host_bytes(true),
            shapes(&small, 1 << 30).host_bytes(true),
        ] {
            let Err(err) = check("this run", needed) else {
                assert!(available_bytes().is_none());
                continue;
            };
            let message = err.to_string();
            assert!(message.starts_with("this run needs ") && message.contains(" GiB, this machine has "));
            assert!(message.ends_with(" GiB available"), "{message}");
        }
    }
}
