//! The paper's Adam variant ("ELLISAdam" in the authors' code) as a Burn optimizer:
//!
//! * **Adam-atan2**: the update is `atan2(m̂, √v̂)` instead of `m̂ / (√v̂ + ε)`, so there is no ε
//!   to tune and the update is bounded by π/2;
//! * **update clipping** (Wortsman et al. 2023): the step size is divided by
//!   `max(1, RMS(g / √v))`, damping steps where the gradient outruns its second moment;
//! * **fully decoupled weight decay**: `θ ← θ·(1 − (lr_t / lr_peak)·wd)`, scaled by the schedule
//!   but not by the learning rate itself;
//! * **running init**: the moments start from the first gradient (`m = g`, `v = g²`).
//!
//! Per parameter tensor and step `t` (1-based):
//! ```text
//! m ← β1·m + (1−β1)·g          v ← max(β2·v + (1−β2)·g², ε²)
//! η = lr_t / max(1, √mean(g² / v)) / (1 − β1^t)
//! θ ← θ·(1 − (lr_t/lr_peak)·wd) − η·atan2(m, √v / √(1 − β2^t))
//! ```

use burn::config::Config;
use burn::module::{ParamGroup, ParamId};
use burn::optim::{AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer};
use burn::prelude::*;
use model::Huginn;
use model::pretrained::ParamRef;

use crate::optim_update::{Scalars, fits_fused, fused_update};

#[derive(Config, Debug)]
pub struct EllisAdamConfig {
    /// The schedule's peak learning rate: weight decay is scaled by `lr_t / peak_lr`.
    pub peak_lr: f64,
    #[config(default = 0.9)]
    pub beta_1: f64,
    #[config(default = 0.95)]
    pub beta_2: f64,
    /// Floor of the second moment (`ε²` is the floor of `v`), as in the reference.
    #[config(default = 1e-6)]
    pub eps: f64,
    #[config(default = 0.0)]
    pub weight_decay: f64,
    #[config(default = true)]
    pub update_clipping: bool,
}

#[derive(Debug, Clone)]
pub struct EllisAdam {
    config: EllisAdamConfig,
}

impl EllisAdamConfig {
    pub fn build(&self) -> EllisAdam {
        EllisAdam { config: self.clone() }
    }

    /// A module optimizer applying this rule to every parameter.
    pub fn init(&self) -> ModuleOptimizer {
        ModuleOptimizer::from(self.build())
    }

    /// The paper's parameter groups for `model`: weight decay on the matrices and the
    /// embedding, none on the norms and the q/k biases.
    pub fn init_grouped(&self, model: &Huginn) -> ModuleOptimizer {
        let without_decay = EllisAdamConfig {
            weight_decay: 0.0,
            ..self.clone()
        }
        .build();
        self.init().with_group(no_decay_group(model), without_decay, None)
    }
}

/// The parameters the paper exempts from weight decay: norms and q/k biases.
pub fn no_decay_group(model: &Huginn) -> ParamGroup {
    let ids: Vec<ParamId> = model
        .reference_params()
        .iter()
        .filter_map(|(_, p)| match p {
            ParamRef::Vector(p) => Some(p.id),
            ParamRef::Bias(p) => Some(p.id),
            ParamRef::Matrix(..) => None,
        })
        .collect();
    ParamGroup::from_ids(ids)
}

impl Optimizer for EllisAdam {
    /// Burn's Adam state (step count and both moments; its AMSGrad slot stays empty), so
    /// optimizer checkpoints use Burn's own record format.
    type State<const D: usize> = AdaptiveMomentumState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let c = &self.config;
        let floor = c.eps * c.eps;
        let time = state.as_ref().map_or(1, |s| s.time + 1);
        let t = time as i32;
        let scalars = Scalars {
            beta_1: c.beta_1 as f32,
            beta_2: c.beta_2 as f32,
            floor: floor as f32,
            step: (lr / (1.0 - c.beta_1.powi(t))) as f32,
            v_correction: (1.0 - c.beta_2.powi(t)).sqrt() as f32,
            decay: (1.0 - lr / c.peak_lr * c.weight_decay) as f32,
            update_clipping: c.update_clipping,
        };
        if fits_fused(&tensor, &grad, state.as_ref().map(|s| [&s.moment_1, &s.moment_2])) {
            let moments = state.map(|s| [s.moment_1, s.moment_2]);
            let [updated, moment_1, moment_2] = fused_update(tensor, grad, moments, scalars);
            return (updated, Some(AdaptiveMomentumState::new(time, moment_1, moment_2)));
        }
        self.composed(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.to_device(device)
    }
}

impl EllisAdam {
    /// The rule with tensor operations, for every backend (the fused update's reference).
    fn composed<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdaptiveMomentumState<D>>,
    ) -> (Tensor<D>, Option<AdaptiveMomentumState<D>>) {
        let c = &self.config;
        let floor = c.eps * c.eps;
        let time = state.as_ref().map_or(1, |s| s.time + 1);
        let t = time as i32;
        let (moment_1, moment_2) = match state {
            None => (grad.clone(), grad.clone().square().clamp_min(floor)),
            Some(s) => (
                s.moment_1.mul_scalar(c.beta_1) + grad.clone().mul_scalar(1.0 - c.beta_1),
                (s.moment_2.mul_scalar(c.beta_2) + grad.clone().square().mul_scalar(1.0 - c.beta_2)).clamp_min(floor),
            ),
        };
        let mut step_size = Tensor::<1>::from_floats([lr / (1.0 - c.beta_1.powi(t))], &tensor.device());
        if c.update_clipping {
            let rms = (grad.square() / moment_2.clone()).mean().sqrt();
            step_size = step_size / rms.clamp_min(1.0);
        }
        let denom = moment_2.clone().sqrt().div_scalar((1.0 - c.beta_2.powi(t)).sqrt());
        let update = moment_1.clone().atan2(denom);
        let decayed = if c.weight_decay == 0.0 {
            tensor
        } else {
            tensor.mul_scalar(1.0 - lr / c.peak_lr * c.weight_decay)
        };
        let step_size: Tensor<D> = step_size.reshape([1; D]);
        let updated = decayed - update * step_size;
        (updated, Some(AdaptiveMomentumState::new(time, moment_1, moment_2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: Tensor<1>) -> Vec<f64> {
        t.into_data().convert::<f64>().try_to_vec::<f64>().unwrap()
    }

    /// The rule computed by hand in f64 for one scalar.
    fn reference(grads: &[f64], theta0: f64, lr: f64, peak: f64, wd: f64) -> f64 {
        let (b1, b2, eps2) = (0.9f64, 0.95f64, 1e-12);
        let (mut m, mut v, mut theta) = (0.0, 0.0, theta0);
        for (i, &g) in grads.iter().enumerate() {
            let t = i as i32 + 1;
            if i == 0 {
                (m, v) = (g, (g * g).max(eps2));
            } else {
                m = b1 * m + (1.0 - b1) * g;
                v = (b2 * v + (1.0 - b2) * g * g).max(eps2);
            }
            let rms = (g * g / v).sqrt();
            let eta = lr / rms.max(1.0) / (1.0 - b1.powi(t));
            theta *= 1.0 - lr / peak * wd;
            theta -= eta * m.atan2(v.sqrt() / (1.0 - b2.powi(t)).sqrt());
        }
        theta
    }

    #[test]
    fn matches_the_rule_computed_by_hand() {
        let device = Device::flex();
        let optim = EllisAdamConfig::new(1e-2).with_weight_decay(0.1).build();
        let grads = [0.5, -0.2, 0.05, 3.0];
        let mut theta = Tensor::<1>::from_floats([1.0], &device);
        let mut state = None;
        for g in grads {
            let grad = Tensor::<1>::from_floats([g as f32], &device);
            (theta, state) = optim.step(5e-3, theta, grad, state);
        }
        let want = reference(&grads, 1.0, 5e-3, 1e-2, 0.1);
        let got = values(theta)[0];
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert_eq!(state.unwrap().time, 4);
    }

    /// The fused update on Flex against the tensor operations, over steps with and without weight
    /// decay, on a parameter larger than one task's chunk (moments of very different scales, so
    /// that update clipping acts).
    #[test]
    fn fused_update_matches_the_tensor_operations() {
        use burn::tensor::Distribution;
        let device = Device::flex();
        for (wd, clipping) in [(0.0, true), (0.1, true), (0.1, false)] {
            let optim = EllisAdamConfig::new(1e-2)
                .with_weight_decay(wd)
                .with_update_clipping(clipping)
                .build();
            let shape = [70, 300];
            let mut fused = Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let mut composed = fused.clone();
            let (mut fused_state, mut composed_state) = (None, None);
            for step in 0..4 {
                let scale = if step == 2 { 50.0 } else { 0.1 };
                let grad = Tensor::<2>::random(shape, Distribution::Normal(0.0, scale), &device);
                assert!(fits_fused(
                    &fused,
                    &grad,
                    fused_state
                        .as_ref()
                        .map(|s: &AdaptiveMomentumState<2>| [&s.moment_1, &s.moment_2])
                ));
                (fused, fused_state) = optim.step(5e-3, fused, grad.clone(), fused_state);
                (composed, composed_state) = optim.composed(5e-3, composed, grad, composed_state);
                let diff = (fused.clone() - composed.clone()).abs().max().into_scalar::<f32>();
                assert!(diff < 1e-6, "wd {wd}, clipping {clipping}, step {step}: {diff}");
            }
            let (f, c) = (fused_state.unwrap(), composed_state.unwrap());
            assert_eq!(f.time, c.time);
            assert!((f.moment_2 - c.moment_2).abs().max().into_scalar::<f32>() < 1e-3);
        }
    }

    #[test]
    fn groups_decay_matrices_but_not_norms_or_biases() {
        use burn::optim::GradientsParams;
        use model::HuginnConfig;
        let device = Device::flex().autodiff();
        let model = HuginnConfig::tiny(20, 16, 2, (1, 1, 1)).init(&device, 1);
        // Zero gradients: the only change is the decay.
        let mut grads = GradientsParams::new();
        for (_, p) in model.reference_params() {
            match p {
                ParamRef::Vector(p) => grads.register(p.id, p.val().zeros_like()),
                ParamRef::Matrix(p, _) => grads.register(p.id, p.val().zeros_like()),
                ParamRef::Bias(p) => grads.register(p.id, p.val().zeros_like()),
            }
        }
        let before_adapter = values(model.adapter.weight.val().flatten(0, 1));
        let before_norm = values(model.ln_f.weight.val());
        let mut optim = EllisAdamConfig::new(1e-2).with_weight_decay(0.5).init_grouped(&model);
        let model = optim.step(1e-2, model, grads);
        let after_adapter = values(model.adapter.weight.val().flatten(0, 1));
        for (a, b) in after_adapter.iter().zip(&before_adapter) {
            assert!((a - b * 0.5).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(values(model.ln_f.weight.val()), before_norm);
    }

    #[test]
    fn steps_are_bounded_and_follow_the_gradient_sign() {
        let device = Device::flex();
        let optim = EllisAdamConfig::new(1e-3).build();
        let theta = Tensor::<1>::from_floats([0.0, 0.0, 0.0], &device);
        let grad = Tensor::<1>::from_floats([1e6, -1e-9, 0.0], &device);
        let (theta, _) = optim.step(1e-3, theta, grad, None);
        let v = values(theta);
        // atan2 bounds the update by π/2 whatever the gradient's size; the first step's bias
        // correction is 1/(1 − β1).
        assert!(
            v[0] < 0.0 && v[0] >= -1e-3 / (1.0 - 0.9) * std::f64::consts::FRAC_PI_2 - 1e-9,
            "{v:?}"
        );
        assert!(v[1] > 0.0);
        assert_eq!(v[2], 0.0);
    }
}
