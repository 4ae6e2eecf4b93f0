//! The model in f16 on wgpu (how it runs on GPUs without bf16) against f32 on the CPU, on the
//! reference fixtures. A test binary of its own: configuring the device's float type is
//! process-wide, and the f32 parity tests run beside each other in theirs. Built with
//! `--features model/wgpu`; skipped, with the reason, without an adapter or without f16.
#![cfg(feature = "wgpu")]

mod common;

use model::burn::prelude::*;
use model::{Backend, Precision};

/// Largest logit difference over the largest |logit|, and how often the top tokens agree.
fn compare(a: &[f32], b: &[f32], vocab: usize) -> (f32, f32) {
    let largest = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let argmax = |row: &[f32]| row.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map(|(i, _)| i);
    let rows = a.len() / vocab;
    let agree = (0..rows)
        .filter(|r| argmax(&a[r * vocab..(r + 1) * vocab]) == argmax(&b[r * vocab..(r + 1) * vocab]))
        .count();
    (diff / largest, agree as f32 / rows as f32)
}

#[test]
fn wgpu_f16_stays_near_f32() {
    let device = match Backend::Wgpu.device_in(Precision::F16) {
        Ok(device) => device,
        Err(err) => {
            println!("SKIPPED: {err}");
            return;
        }
    };
    let ids = [vec![5u32, 17, 99, 3, 42, 8, 64, 1, 77, 120, 6, 13]];
    for case in ["tiny-a", "tiny-c", "tiny-d"] {
        let dir = common::fixture_dir(case);
        let cpu = model::Huginn::from_pretrained(&dir, &Device::flex()).unwrap();
        let half = model::Huginn::from_pretrained(&dir, &device).unwrap();
        let vocab = cpu.config().vocab_size;
        for steps in [4, 32] {
            let logits = |model: &model::Huginn| -> Vec<f32> {
                let tokens = model.tokens(&ids).unwrap();
                let logits = model.forward(tokens, steps).logits.into_data();
                logits.convert::<f32>().try_to_vec::<f32>().unwrap()
            };
            let (a, b) = (logits(&cpu), logits(&half));
            assert!(
                b.iter().all(|x| x.is_finite()),
                "{case} at {steps} steps: f16 logits not finite"
            );
            let (relative, agreement) = compare(&a, &b, vocab);
            println!(
                "{case} f16 on wgpu vs f32 on the CPU at {steps} steps: largest logit difference {:.2}% of the largest |logit|, top-1 agreement {:.0}%",
                100.0 * relative,
                100.0 * agreement
            );
            assert!(relative < 0.01, "{case} at {steps} steps: {relative}");
        }
    }
}
