//! The model's public steps compose into the forward pass, and the initial-state options
//! behave as documented.

use model::burn::prelude::*;
use model::{FullCache, Huginn, HuginnConfig, InitialState, NoCache};

fn model() -> Huginn {
    HuginnConfig::tiny(50, 32, 4, (2, 2, 1)).init(&Device::flex(), 11)
}

fn max_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

#[test]
fn steps_compose_into_forward() {
    let m = model();
    let ids = m.tokens(&[vec![1, 2, 3, 4, 5, 6], vec![7, 8, 9, 10, 11, 12]]).unwrap();
    let full = m.forward(ids.clone(), 5);

    let rotary = m.rotary(0, 6);
    let e = m.embed_prelude(ids, &rotary, &mut NoCache);
    let mut s = m.initial_state(&e, &InitialState::Zeros);
    let mut observed = Vec::new();
    for i in 0..5 {
        s = m.core_step(s, &e, i, &rotary, &mut NoCache);
        observed.push(s.clone());
    }
    assert_eq!(
        max_diff(m.coda_head(s.clone(), &rotary, &mut NoCache), full.logits.clone()),
        0.0
    );
    assert_eq!(max_diff(s.clone(), full.state.clone()), 0.0);
    assert_eq!(max_diff(m.latent(s), full.latent), 0.0);

    let mut seen = Vec::new();
    m.forward_with(
        m.tokens(&[vec![1, 2, 3, 4, 5, 6], vec![7, 8, 9, 10, 11, 12]]).unwrap(),
        5,
        &InitialState::Zeros,
        0,
        &mut NoCache,
        |i, s| seen.push((i, s.clone())),
    );
    assert_eq!(seen.len(), 5);
    for ((i, s), want) in seen.into_iter().zip(observed) {
        assert_eq!(max_diff(s, want), 0.0, "iteration {i}");
    }
}

#[test]
fn depth_changes_the_prediction_and_zero_steps_is_allowed() {
    let m = model();
    let ids = m.tokens(&[vec![3, 1, 4, 1, 5]]).unwrap();
    let zero = m.forward(ids.clone(), 0);
    assert_eq!(max_diff(zero.state, Tensor::zeros([1, 5, 32], &Device::flex())), 0.0);
    let one = m.forward(ids.clone(), 1).logits;
    let four = m.forward(ids, 4).logits;
    assert!(max_diff(one, four) > 1e-3);
}

#[test]
fn like_init_is_seeded_scaled_and_truncated() {
    let m = model();
    let e = Tensor::<3>::zeros([2, 8, 32], &Device::flex());
    let draw = |seed| m.initial_state(&e, &InitialState::LikeInit { seed, scale: 1.0 });
    assert_eq!(max_diff(draw(1), draw(1)), 0.0);
    assert!(max_diff(draw(1), draw(2)) > 0.1);
    let values: Vec<f32> = draw(3).into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    // std √(2/5) ≈ 0.632 before truncation at ±3σ·√h/√h = ±1.897.
    assert!(values.iter().all(|v| v.abs() <= 1.8974));
    let std = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
    assert!((std - 0.628).abs() < 0.05, "{std}");
    let zero = m.initial_state(&e, &InitialState::LikeInit { seed: 1, scale: 0.0 });
    assert_eq!(zero.abs().max().into_scalar::<f32>(), 0.0);
}

#[test]
fn chunked_prefill_through_a_full_cache_equals_one_pass() {
    let m = model();
    let row: Vec<u32> = (0..11).map(|i| (i * 7 % 50) as u32).collect();
    let whole = m.forward(m.tokens(std::slice::from_ref(&row)).unwrap(), 3).logits;
    let mut cache = FullCache::new();
    let mut parts = Vec::new();
    for (start, end) in [(0, 4), (4, 5), (5, 11)] {
        let ids = m.tokens(&[row[start..end].to_vec()]).unwrap();
        parts.push(
            m.forward_with(ids, 3, &InitialState::Zeros, start, &mut cache, |_, _| {})
                .logits,
        );
    }
    let core_slot = model::LayerSlot::Core { iteration: 2, layer: 1 };
    assert_eq!(cache.len(core_slot), 11);
    assert!(max_diff(Tensor::cat(parts, 1), whole) < 1e-5);
}

#[test]
fn device_drawn_weights_have_the_shapes_and_spreads_of_the_seeded_ones() {
    let config = HuginnConfig::tiny(64, 48, 4, (1, 2, 1));
    let (seeded, drawn) = (config.init(&Device::flex(), 0), config.init_on_device(&Device::flex()));
    let std = |t: Tensor<2>| {
        let v: Vec<f32> = t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt()
    };
    assert_eq!(drawn.num_params(), seeded.num_params());
    for (a, b) in [
        (seeded.wte.val(), drawn.wte.val()),
        (seeded.adapter.weight.val(), drawn.adapter.weight.val()),
        (
            seeded.core_block[1].mlp.proj.weight.val(),
            drawn.core_block[1].mlp.proj.weight.val(),
        ),
    ] {
        assert_eq!(a.dims(), b.dims());
        let (sa, sb) = (std(a), std(b));
        // Truncation at 3σ keeps 98.7% of the variance.
        assert!((sb * 0.9933 / sa - 1.0).abs() < 0.1, "seeded {sa}, device {sb}");
    }
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 2, 3], [1, 3]), &Device::flex());
    let logits = drawn.forward(ids, 4).logits;
    assert!(logits.is_finite().all().into_scalar::<bool>());
}

/// `Huginn::rotary` takes positions from a table of the context where it covers them (bounded in
/// memory) and computes those of a vast context past it: the same rotation either way.
#[test]
fn rotations_are_the_same_from_the_table_or_computed() {
    let device = Device::flex();
    let mut config = HuginnConfig::tiny(50, 32, 4, (1, 1, 1));
    config.block_size = 1 << 22;
    let m = config.init(&device, 3);
    let d = config.head_dim();
    let x = Tensor::<4>::random([1, 3, 2, d], model::burn::tensor::Distribution::Default, &device);
    // In the table (32 MiB of positions: 2^19 at d = 8) and past it.
    for start in [0, 1000, (1 << 19) - 3, (1 << 19) + 5, (1 << 22) - 3] {
        let computed = model::Rotary::contiguous(start, 1, 3, d, config.rope_base, &device);
        let got = m.rotary(start, 3).apply(x.clone());
        let want = computed.apply(x.clone());
        assert_eq!((got - want).abs().max().into_scalar::<f32>(), 0.0, "start {start}");
    }
}

/// A model that ran under autodiff (its rotation table made on that device) and is then taken
/// without autodiff computes what a model made without autodiff computes, to the bit.
#[test]
fn a_trained_model_taken_without_autodiff_computes_what_a_fresh_one_does() {
    let config = HuginnConfig::tiny(50, 32, 4, (1, 1, 1));
    let trained = config.init(&Device::flex().autodiff(), 5);
    let ids = [vec![1, 2, 3, 4, 5]];
    trained.forward(trained.tokens(&ids).unwrap(), 2);
    let valid = trained.valid();
    let fresh = config.init(&Device::flex(), 5);
    let logits = |m: &Huginn| {
        m.forward(m.tokens(&ids).unwrap(), 2)
            .logits
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(logits(&valid), logits(&fresh));
}
