//! The reference parity checks on the wgpu backend (Vulkan; Mesa's lavapipe on machines
//! without a GPU). Built with `--features model/wgpu`; skipped, with the reason, when the
//! machine has no adapter at all.
#![cfg(feature = "wgpu")]

mod common;

use model::Backend;
use model::burn::prelude::*;
use model::fixture::Fixture;

fn wgpu_device() -> Option<Device> {
    match Backend::Wgpu.device() {
        Ok(device) => Some(device),
        Err(err) => {
            println!("SKIPPED: {err}");
            None
        }
    }
}

#[test]
fn wgpu_forward_matches_reference_and_cpu() {
    let Some(device) = wgpu_device() else { return };
    println!("wgpu device: {device:?}");
    for case in ["tiny-a", "tiny-d"] {
        let dir = common::fixture_dir(case);
        let checks = Fixture::open(&dir, &device).unwrap().check_forward().unwrap();
        let worst = checks.iter().map(|c| c.max_abs_err).fold(0.0, f64::max);
        println!(
            "{case} wgpu vs reference: {} checks, max |err| {worst:.3e}",
            checks.len()
        );
        let failed: Vec<_> = checks.iter().filter(|c| !c.passed).collect();
        assert!(failed.is_empty(), "{case} on wgpu: {failed:#?}");

        let cpu = model::Huginn::from_pretrained(&dir, &Device::flex()).unwrap();
        let gpu = model::Huginn::from_pretrained(&dir, &device).unwrap();
        let ids = [vec![5u32, 17, 99, 3, 42, 8, 64]];
        let a: Vec<f32> = cpu
            .forward(cpu.tokens(&ids).unwrap(), 16)
            .logits
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let b: Vec<f32> = gpu
            .forward(gpu.tokens(&ids).unwrap(), 16)
            .logits
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        println!("{case} wgpu vs cpu logits at 16 steps: max |diff| {diff:.3e}");
        assert!(diff < 1e-4, "{diff}");
    }
}

/// 8- and 4-bit weights on wgpu: packed on the device by Burn, multiplied by Burn's quantized
/// product, the same model as on the CPU up to the order of the sums.
#[test]
fn wgpu_quantized_weights_match_the_cpu() {
    let Some(device) = wgpu_device() else { return };
    for case in ["tiny-a", "tiny-d"] {
        let dir = common::fixture_dir(case);
        for bits in [model::Bits::Eight, model::Bits::Four] {
            let cpu = model::Huginn::from_pretrained_quantized(&dir, &Device::flex(), Some(bits)).unwrap();
            let gpu = model::Huginn::from_pretrained_quantized(&dir, &device, Some(bits)).unwrap();
            let ids = [vec![5u32, 17, 99, 3, 42, 8, 64]];
            let logits = |model: &model::Huginn| -> Vec<f32> {
                model
                    .forward(model.tokens(&ids).unwrap(), 8)
                    .logits
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap()
            };
            let (a, b) = (logits(&cpu), logits(&gpu));
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            println!("{case} {bits:?} wgpu vs cpu logits at 8 steps: max |diff| {diff:.3e}");
            assert!(diff < 1e-3, "{case} {bits:?}: {diff}");
        }
    }
}
