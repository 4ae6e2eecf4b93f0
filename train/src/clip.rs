//! Global-norm gradient clipping (the paper clips the L2 norm of ALL gradients together at 1.0;
//! Burn's built-in clipping works per parameter).

use burn::optim::GradientsParams;
use burn::prelude::*;
use model::Huginn;
use model::pretrained::ParamRef;

/// Scales every gradient by `min(1, max_norm / ‖g‖)`, `‖g‖` being the L2 norm over all of them,
/// and returns `‖g‖` before clipping (non-finite when a gradient is: the caller aborts then).
pub fn clip_global_norm(model: &Huginn, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let params = model.reference_params();
    let mut squares: Vec<Tensor<1>> = Vec::new();
    for (_, param) in &params {
        let sum = match param {
            ParamRef::Vector(p) => grads.get::<1>(p.id).map(|g| g.square().sum()),
            ParamRef::Matrix(p, _) => grads.get::<2>(p.id).map(|g| g.square().sum()),
            ParamRef::Bias(p) => grads.get::<4>(p.id).map(|g| g.square().sum()),
        };
        squares.extend(sum);
    }
    if squares.is_empty() {
        return 0.0;
    }
    let norm = Tensor::cat(squares, 0).sum().sqrt().into_scalar::<f32>() as f64;
    let scale = max_norm / (norm + 1e-6);
    if norm.is_finite() && scale < 1.0 {
        for (_, param) in &params {
            match param {
                ParamRef::Vector(p) => rescale::<1>(grads, p.id, scale),
                ParamRef::Matrix(p, _) => rescale::<2>(grads, p.id, scale),
                ParamRef::Bias(p) => rescale::<4>(grads, p.id, scale),
            }
        }
    }
    norm
}

fn rescale<const D: usize>(grads: &mut GradientsParams, id: burn::module::ParamId, scale: f64) {
    if let Some(g) = grads.remove::<D>(id) {
        grads.register(id, g.mul_scalar(scale));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{HuginnConfig, InitialState, cross_entropy};

    fn backward(model: &Huginn) -> burn::tensor::Gradients {
        let ids = model.tokens(&[vec![1, 4, 9, 16, 25, 36]]).unwrap();
        let labels = model.tokens(&[vec![4, 9, 16, 25, 36, 1]]).unwrap();
        let out = model.forward_truncated(ids, 1, 2, &InitialState::Zeros);
        cross_entropy(out.logits, labels).backward()
    }

    fn grads_of(model: &Huginn) -> GradientsParams {
        GradientsParams::from_grads(backward(model), model)
    }

    #[test]
    fn clips_the_norm_of_all_gradients_together() {
        let device = Device::flex().autodiff();
        let model = HuginnConfig::tiny(40, 16, 2, (1, 1, 1)).init(&device, 3);
        let mut grads = grads_of(&model);
        let norm = clip_global_norm(&model, &mut grads, f64::INFINITY);
        // The same norm summed on the host over every named parameter's gradient.
        let raw = backward(&model);
        let host: f64 = model
            .reference_params()
            .iter()
            .flat_map(|(_, p)| p.grad(&raw).expect("every parameter has a gradient"))
            .map(|g| (g as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(norm > 0.0 && (norm - host).abs() < 1e-4 * host, "{norm} vs {host}");
        let again = clip_global_norm(&model, &mut grads, 2.0 * norm);
        assert!(
            (again - norm).abs() < 1e-4 * norm,
            "a larger bound leaves gradients alone"
        );
        clip_global_norm(&model, &mut grads, norm / 4.0);
        let clipped = clip_global_norm(&model, &mut grads, f64::INFINITY);
        assert!(
            (clipped - norm / 4.0).abs() < 1e-3 * norm,
            "{clipped} vs {}",
            norm / 4.0
        );
    }
}
