//! One optimizer step of randomized-depth training: for each micro-batch, the truncated
//! forward pass (the depth drawn once for the whole step, as the paper's lock-step sampling),
//! the loss and its gradients, accumulated; then global-norm clipping and the update. A
//! non-finite loss or gradient norm stops the step before the model changes.
//!
//! # Scale-out across devices (Burn 0.22.1, read in its sources; not implemented here)
//!
//! What Burn provides:
//! * `burn-train`'s `Learner` runs on one device, on several local ones (`MultiDevice`: a thread
//!   and a `fork`ed replica per device each step; the gradients are either moved to the first
//!   device and accumulated there, `OptimMainDevice`, or combined per parameter on a device
//!   picked by its id, `OptimSharded` through `MultiGradientsParams` and
//!   `ModuleOptimizer::step_multi`), or as DDP (`DistributedDataParallel`: a thread and replica
//!   per device, parameters marked with `Tensor::set_distributed`, and `backward()` all-reduces
//!   each parameter's gradient as soon as it is final, then waits for the collective). These
//!   strategies belong to the `Learner` and its data loaders (the `train` feature, with its TUI),
//!   but what they are built from is public and fits a custom loop: `Module::fork`,
//!   `GradientsParams::to_device`, `GradientsAccumulator`, `MultiGradientsParams`, and
//!   `burn::tensor::distributed` (`DistributedContext::init(devices, DistributedConfig {
//!   all_reduce_op: Mean | Sum })`, `all_reduce`).
//! * All-reduce exists only on CUDA (NCCL, in `cubecl-cuda`); on wgpu and the CPU backends a
//!   collective panics (`burn-backend-extension`'s catalog says so). The NCCL communicator id is
//!   minted in-process, so DDP spans the GPUs of one process: nothing in 0.22.1 joins machines
//!   (there is no `burn-collective` crate any more; the DDP README leaves other nodes to the
//!   user). Our CUDA backend does not build offline, so today no collective is reachable here.
//!
//! How [`train_step`] would take it without a rewrite: its micro-batches are already the unit to
//! spread, the depth is drawn once per optimizer step (every replica runs the same graph), and
//! each micro-batch's initial state is seeded by its index (keep the global index).
//! * Any backend, one machine (`OptimMainDevice`): each step, `fork` the model to every device,
//!   run the micro-batches' forward and backward there in threads (micro-batch `i` on device
//!   `i mod D`), bring each `GradientsParams` to the main device with `to_device` and feed the
//!   existing accumulator; clipping, the finite checks and `optim.step` stay as they are.
//!   Between wgpu devices the gradients travel through host memory.
//! * CUDA, DDP: mark the parameters with `set_distributed` (a `ModuleMapper`, as burn-train's
//!   `ModuleSharder`), hold a `DistributedContext` with `Mean`, and call `train_step` unchanged
//!   from one thread per device, each with its replica, its optimizer and `1/D` of the
//!   micro-batches: every `backward()` then averages the gradient over the devices, so every
//!   replica clips and applies the same update. The all-reduce runs per micro-batch, not once per
//!   optimizer step (as in burn-train's DDP epoch).

use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use model::{Huginn, InitialState, cross_entropy};

use crate::clip::clip_global_norm;
use crate::depth::Depth;

/// Inputs and labels (`-100` = ignored) of one micro-batch, `[B, S]` each.
pub struct MicroBatch {
    pub inputs: Tensor<2, Int>,
    pub labels: Tensor<2, Int>,
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StepError {
    #[error("non-finite loss ({0}); the model was not updated")]
    NonFiniteLoss(f64),
    #[error("non-finite gradient norm ({0}); the model was not updated")]
    NonFiniteGradient(f64),
    #[error("a step needs at least one micro-batch")]
    NoData,
}

/// How one step runs.
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    pub depth: Depth,
    pub lr: f64,
    /// Global-norm clipping bound (the paper: 1.0).
    pub max_grad_norm: Option<f64>,
    /// Seed of the random initial state ("like-init") of this step.
    pub state_seed: u64,
    /// Scale of that random state (the reference's `init_scale`; 0 starts from zeros).
    pub state_scale: f64,
}

/// Runs one optimizer step over `batches` (gradient accumulation when there are several) and
/// returns the updated model. On an error the model is returned unchanged alongside it.
pub fn train_step(
    model: Huginn,
    optim: &mut ModuleOptimizer,
    batches: &[MicroBatch],
    config: StepConfig,
) -> (Huginn, Result<StepReport, StepError>) {
    if batches.is_empty() {
        return (model, Err(StepError::NoData));
    }
    let mut accumulator = GradientsAccumulator::<Huginn>::new();
    let mut loss_sum = 0.0;
    let scale = 1.0 / batches.len() as f64;
    for (i, batch) in batches.iter().enumerate() {
        let init = InitialState::LikeInit {
            seed: config.state_seed.wrapping_add(i as u64),
            scale: config.state_scale,
        };
        let out = model.forward_truncated(
            batch.inputs.clone(),
            config.depth.no_grad,
            config.depth.with_grad,
            &init,
        );
        let loss = cross_entropy(out.logits, batch.labels.clone());
        let value = loss.clone().into_scalar::<f32>() as f64;
        if !value.is_finite() {
            return (model, Err(StepError::NonFiniteLoss(value)));
        }
        loss_sum += value;
        let grads = GradientsParams::from_grads(loss.mul_scalar(scale).backward(), &model);
        accumulator.accumulate(&model, grads);
    }
    let mut grads = accumulator.grads();
    let grad_norm = clip_global_norm(&model, &mut grads, config.max_grad_norm.unwrap_or(f64::INFINITY));
    if !grad_norm.is_finite() {
        return (model, Err(StepError::NonFiniteGradient(grad_norm)));
    }
    let model = optim.step(config.lr, model, grads);
    (
        model,
        Ok(StepReport {
            loss: loss_sum * scale,
            grad_norm,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::EllisAdamConfig;
    use model::HuginnConfig;

    fn batch(model: &Huginn, rows: &[Vec<u32>]) -> MicroBatch {
        let inputs: Vec<Vec<u32>> = rows.iter().map(|r| r[..r.len() - 1].to_vec()).collect();
        let labels: Vec<Vec<u32>> = rows.iter().map(|r| r[1..].to_vec()).collect();
        MicroBatch {
            inputs: model.tokens(&inputs).unwrap(),
            labels: model.tokens(&labels).unwrap(),
        }
    }

    #[test]
    fn steps_reduce_the_loss_of_a_repeated_batch() {
        let device = Device::flex().autodiff();
        let mut model = HuginnConfig::tiny(16, 32, 4, (1, 1, 1)).init(&device, 5);
        let data = [vec![1, 2, 3, 4, 5, 6, 7, 8, 9], vec![9, 8, 7, 6, 5, 4, 3, 2, 1]];
        let mut optim = EllisAdamConfig::new(3e-3).init_grouped(&model);
        let mut losses = Vec::new();
        for step in 0..30 {
            let config = StepConfig {
                depth: Depth {
                    no_grad: 1,
                    with_grad: 2,
                },
                lr: 3e-3,
                max_grad_norm: Some(1.0),
                state_seed: step,
                state_scale: 1.0,
            };
            let batches = [batch(&model, &data[..1]), batch(&model, &data[1..])];
            let (next, report) = train_step(model, &mut optim, &batches, config);
            model = next;
            losses.push(report.unwrap().loss);
        }
        assert!(losses[29] < 0.5 * losses[0], "{losses:?}");
    }

    #[test]
    fn empty_steps_are_errors() {
        let device = Device::flex().autodiff();
        let model = HuginnConfig::tiny(16, 16, 2, (1, 1, 1)).init(&device, 5);
        let mut optim = EllisAdamConfig::new(1e-3).init();
        let config = StepConfig {
            depth: Depth {
                no_grad: 0,
                with_grad: 1,
            },
            lr: 1e-3,
            max_grad_norm: None,
            state_seed: 0,
            state_scale: 1.0,
        };
        let (_, report) = train_step(model, &mut optim, &[], config);
        assert_eq!(report, Err(StepError::NoData));
    }
}
