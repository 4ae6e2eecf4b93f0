//! The largest magnitude each activation of a forward pass reaches, by where it arises: whether
//! a model's values fit a narrower float type (f16 tops out at 65504) before anyone runs it in
//! one. The model's steps report their intermediate tensors to [`note`], which does nothing
//! unless [`record`] is running on the same thread, so looking inside a pass needs no second
//! copy of the recurrence.

use std::cell::RefCell;
use std::collections::BTreeMap;

use burn::prelude::*;
use burn::tensor::FloatDType;

/// Largest `|value|` per (stage, point), and whether any value there was not finite.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ranges {
    pub points: BTreeMap<(&'static str, &'static str), Range>,
}

/// What one point of the pass reached.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Range {
    /// Largest magnitude of its finite values.
    pub largest: f32,
    /// Whether some value was infinite or NaN.
    pub not_finite: bool,
}

struct Recording {
    stage: &'static str,
    ranges: Ranges,
}

thread_local! {
    static RECORDING: RefCell<Option<Recording>> = const { RefCell::new(None) };
}

/// Runs `pass` and returns what its activations reached on this thread. Records do not nest:
/// an inner `record` keeps its own and the outer one misses those values.
pub fn record<R>(pass: impl FnOnce() -> R) -> (R, Ranges) {
    let outer = RECORDING.with(|r| {
        r.borrow_mut().replace(Recording {
            stage: "",
            ranges: Ranges::default(),
        })
    });
    let result = pass();
    let recorded = RECORDING.with(|r| std::mem::replace(&mut *r.borrow_mut(), outer));
    (result, recorded.map(|r| r.ranges).unwrap_or_default())
}

/// Names the stage (prelude, core, coda, ...) that the following notes belong to.
pub(crate) fn stage(name: &'static str) {
    RECORDING.with(|r| {
        if let Some(recording) = r.borrow_mut().as_mut() {
            recording.stage = name;
        }
    });
}

/// Records `x`'s largest magnitude at `point` of the current stage, while a record runs.
pub(crate) fn note<const D: usize>(point: &'static str, x: &Tensor<D>) {
    if RECORDING.with(|r| r.borrow().is_none()) {
        return;
    }
    let x = x.clone().cast(FloatDType::F32);
    let not_finite = x.clone().is_nan().any().into_scalar::<bool>() || x.clone().is_inf().any().into_scalar::<bool>();
    let finite = x.clone().is_finite();
    let largest = x.abs().mask_fill(finite.bool_not(), 0.0).max().into_scalar::<f32>();
    RECORDING.with(|r| {
        if let Some(recording) = r.borrow_mut().as_mut() {
            let range = recording.ranges.points.entry((recording.stage, point)).or_default();
            range.largest = range.largest.max(largest);
            range.not_finite |= not_finite;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HuginnConfig;

    fn tokens(model: &crate::Huginn) -> Tensor<2, Int> {
        model.tokens(&[vec![1, 5, 9, 2, 7]]).unwrap()
    }

    #[test]
    fn a_recorded_pass_reports_every_stage_and_leaves_the_result_alone() {
        let device = Device::flex();
        let model = HuginnConfig::tiny(32, 16, 2, (1, 2, 1)).init(&device, 3);
        let plain: Vec<f32> = model
            .forward(tokens(&model), 3)
            .logits
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let (forward, ranges) = record(|| model.forward(tokens(&model), 3));
        let recorded: Vec<f32> = forward.logits.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(plain, recorded);
        let stages: Vec<&str> = ranges.points.keys().map(|(stage, _)| *stage).collect();
        for stage in ["embedding", "prelude", "core", "coda", "head"] {
            assert!(stages.contains(&stage), "{stage} missing from {stages:?}");
        }
        assert!(ranges.points.contains_key(&("core", "MLP hidden")));
        assert!(ranges.points.contains_key(&("core", "adapter output")));
        for (point, range) in &ranges.points {
            assert!(
                range.largest > 0.0 && range.largest.is_finite() && !range.not_finite,
                "{point:?}: {range:?}"
            );
        }
        // Nothing is recorded outside `record`.
        let (_, empty) = record(|| ());
        assert!(empty.points.is_empty());
    }

    #[test]
    fn values_beyond_f16_and_non_finite_ones_show() {
        let device = Device::flex();
        let mut model = HuginnConfig::tiny(32, 16, 2, (1, 1, 1)).init(&device, 3);
        model.wte = model.wte.map(|w| w.mul_scalar(1e5));
        let (_, ranges) = record(|| model.forward(tokens(&model), 2));
        let embedding = ranges.points[&("embedding", "scaled embedding")];
        assert!(embedding.largest > 65504.0, "{embedding:?}");
        model.wte = model.wte.map(|w| w.mul_scalar(f32::INFINITY));
        let (_, ranges) = record(|| model.forward(tokens(&model), 2));
        assert!(ranges.points[&("embedding", "scaled embedding")].not_finite);
    }
}
