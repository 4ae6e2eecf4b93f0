//! One optimizer step of randomized-depth training: for each micro-batch, the truncated
//! forward pass (the depth drawn once for the whole step, as the paper's lock-step sampling),
//! the loss and its gradients, accumulated; then global-norm clipping and the update. A
//! non-finite loss or gradient norm stops the step before the model changes.
//!
//! # Several devices of one machine
//!
//! [`train_step_on`] spreads a step's micro-batches over devices with Burn 0.22.1's own pieces,
//! as burn-train's `MultiDevice` / `OptimMainDevice` strategy does, in this loop rather than the
//! `Learner`'s: each step `Module::fork`s the model to every device in a thread of its own;
//! micro-batch `i` (made on its device, seeded initial state by its global index) runs its
//! forward and backward on device `i mod D`; its `GradientsParams` go to the first device with
//! `GradientsParams::to_device` (between wgpu devices, through host memory) and into one
//! `GradientsAccumulator` there, in the order of `i`. Clipping, the finite checks and
//! `optim.step` then run once, as on one device. Because every micro-batch's gradient is
//! computed as one device would and the sum keeps one order, a step's numbers do not depend on
//! the device count: on two handles of the CPU device they are bit-identical to one device
//! (`tests/devices.rs`). The cost is one gradient transfer per micro-batch (not per device) and
//! one broadcast of the weights per step; a channel of one slot per device bounds the
//! gradients waiting on the first device to two per device. One device, the model's own,
//! runs in the calling thread with no fork, exactly as before.
//!
//! # Where Burn stops (0.22.1, read in its sources)
//!
//! * An all-reduce exists only on CUDA (NCCL, in `cubecl-cuda`): `burn::tensor::distributed`
//!   (`DistributedContext::init(devices, DistributedConfig { all_reduce_op })`, parameters marked
//!   with `Tensor::set_distributed`, and `backward()` all-reducing each parameter's gradient).
//!   On wgpu and the CPU backends a collective panics. Not used here: DDP keeps a replica and an
//!   optimizer per device for the whole run and averages per micro-batch in an order NCCL
//!   chooses, so checkpoints, resume across device counts and bit-identical numbers would each
//!   need a second path; and our CUDA backend cannot be built offline, so nothing of it could
//!   be run or tested here.
//! * Nothing joins machines: the NCCL communicator id is minted in-process, there is no
//!   `burn-collective` crate any more, and the DDP README leaves other nodes to the user.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::sync_channel;

use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use model::{Huginn, InitialState, cross_entropy};

use crate::clip::clip_global_norm;
use crate::depth::Depth;

/// Inputs and labels (`-100` = ignored) of one micro-batch, `[B, S]` each.
#[derive(Clone)]
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
    /// Found when the weights are saved: the update of a finite step can still overflow.
    #[error("the updated weights are not all finite; they were not saved")]
    NonFiniteWeights,
    #[error("a step needs at least one micro-batch and one device")]
    NoData,
    /// A replica's thread panicked (a device lost, out of memory): Burn reports those by
    /// panicking, so the step catches it and leaves the model as it was.
    #[error("the replica on device {device} of the list failed: {message}; the model was not updated")]
    Replica { device: usize, message: String },
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

/// Makes micro-batch `i` of a step on a device (where its replica runs).
pub type BatchFn<'a> = dyn Fn(usize, &Device) -> MicroBatch + Sync + 'a;

/// Runs one optimizer step over `batches`, on the model's device (gradient accumulation when
/// there are several), and returns the updated model. On an error the model is returned
/// unchanged alongside it.
pub fn train_step(
    model: Huginn,
    optim: &mut ModuleOptimizer,
    batches: &[MicroBatch],
    config: StepConfig,
) -> (Huginn, Result<StepReport, StepError>) {
    let device = model.device();
    train_step_on(
        model,
        optim,
        &[device],
        batches.len(),
        &|i, _| batches[i].clone(),
        config,
    )
}

/// Runs one optimizer step of `micro_batches` micro-batches spread over `devices`: micro-batch
/// `i` is made by `batch(i, device)` and runs on `devices[i % D]`, where a replica forked from
/// the model computes its forward and backward in a thread of its own. The gradients come back
/// to the model's device and are accumulated there in the order of `i`, so the sum does not
/// depend on `D`; clipping, the finite checks and the update run there once. With one device,
/// the model's own, everything runs in the calling thread on the model itself.
pub fn train_step_on(
    model: Huginn,
    optim: &mut ModuleOptimizer,
    devices: &[Device],
    micro_batches: usize,
    batch: &BatchFn,
    config: StepConfig,
) -> (Huginn, Result<StepReport, StepError>) {
    if micro_batches == 0 || devices.is_empty() {
        return (model, Err(StepError::NoData));
    }
    let scale = 1.0 / micro_batches as f64;
    let mut accumulator = GradientsAccumulator::<Huginn>::new();
    let mut loss_sum = 0.0;
    let mut take = |(loss, grads): (f64, GradientsParams)| {
        loss_sum += loss;
        accumulator.accumulate(&model, grads);
    };
    let done = match devices {
        [device] if *device == model.device() => {
            (0..micro_batches).try_for_each(|i| micro_step(&model, batch(i, device), i, scale, &config).map(&mut take))
        }
        _ => on_replicas(&model, devices, micro_batches, batch, scale, &config, take),
    };
    if let Err(e) = done {
        return (model, Err(e));
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

/// Micro-batch `index`'s loss and its gradients (of the loss times `scale`) on `model`'s device.
fn micro_step(
    model: &Huginn,
    batch: MicroBatch,
    index: usize,
    scale: f64,
    config: &StepConfig,
) -> Result<(f64, GradientsParams), StepError> {
    let init = InitialState::LikeInit {
        seed: config.state_seed.wrapping_add(index as u64),
        scale: config.state_scale,
    };
    let out = model.forward_truncated(batch.inputs, config.depth.no_grad, config.depth.with_grad, &init);
    let loss = cross_entropy(out.logits, batch.labels);
    let value = loss.clone().into_scalar::<f32>() as f64;
    if !value.is_finite() {
        return Err(StepError::NonFiniteLoss(value));
    }
    Ok((
        value,
        GradientsParams::from_grads(loss.mul_scalar(scale).backward(), model),
    ))
}

/// The micro-batches on one thread and forked replica per device (burn-train's
/// `OptimMainDevice` strategy). Each thread hands its gradients, already moved to the model's
/// device, through a channel of one slot; `take` receives them in the order of the micro-batch
/// index, so at most two gradients per device wait. The first error in that order ends the
/// step: dropping the receivers stops the other threads at their next hand-over.
fn on_replicas(
    model: &Huginn,
    devices: &[Device],
    micro_batches: usize,
    batch: &BatchFn,
    scale: f64,
    config: &StepConfig,
    mut take: impl FnMut((f64, GradientsParams)),
) -> Result<(), StepError> {
    let main = model.device();
    let count = devices.len();
    std::thread::scope(|scope| {
        let receivers: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(slot, device)| {
                let (sender, receiver) = sync_channel(1);
                let (replica, main) = (model.clone(), main.clone());
                scope.spawn(move || {
                    let ran = catch_unwind(AssertUnwindSafe(|| {
                        let replica = replica.fork(device);
                        for i in (slot..micro_batches).step_by(count) {
                            let out = micro_step(&replica, batch(i, device), i, scale, config)
                                .map(|(loss, grads)| (loss, grads.to_device(&main, &replica)));
                            let failed = out.is_err();
                            if sender.send(out).is_err() || failed {
                                return;
                            }
                        }
                    }));
                    if let Err(payload) = ran {
                        let message = payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic without a message".into());
                        // The receiver may be gone already, when an earlier error ended the step.
                        let _ = sender.send(Err(StepError::Replica { device: slot, message }));
                    }
                });
                receiver
            })
            .collect();
        for i in 0..micro_batches {
            let slot = i % count;
            let out = receivers[slot].recv().unwrap_or_else(|_| {
                Err(StepError::Replica {
                    device: slot,
                    message: "its thread ended without an answer".into(),
                })
            });
            take(out?);
        }
        Ok(())
    })
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
    fn a_replica_that_fails_fails_the_step_and_leaves_the_model_as_it_was() {
        let device = Device::flex().autodiff();
        let model = HuginnConfig::tiny(16, 16, 2, (1, 1, 1)).init(&device, 5);
        let before = model.wte.val().into_data();
        let mut optim = EllisAdamConfig::new(1e-3).init();
        let good = batch(&model, &[vec![1, 2, 3, 4, 5]]);
        let make = |i: usize, _: &Device| match i {
            3 => panic!("device lost"),
            _ => good.clone(),
        };
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
        let devices = [device.clone(), device];
        let (model, report) = train_step_on(model, &mut optim, &devices, 4, &make, config);
        let expected = StepError::Replica {
            device: 1,
            message: "device lost".into(),
        };
        assert_eq!(report, Err(expected));
        assert_eq!(model.wte.val().into_data(), before);
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
