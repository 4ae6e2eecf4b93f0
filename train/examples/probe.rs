use burn::prelude::*;
use model::HuginnConfig;
use train::batch::{exact_match, make_batch};
use train::chains::{ChainTask, PAD, Split, VOCAB_SIZE};
use train::depth::DepthScheme;
use train::optim::EllisAdamConfig;
use train::schedule::Schedule;
use train::step::{MicroBatch, StepConfig, train_step};

fn env(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let device = Device::flex().autodiff();
    let d = env("D", 64.0) as usize;
    let core = env("CORE", 2.0) as usize;
    let steps = env("STEPS", 3000.0) as u64;
    let lr = env("LR", 1e-3);
    let bs = env("BS", 32.0) as usize;
    let mean = env("MEAN", 6.0) as usize;
    let mut config = HuginnConfig::tiny(VOCAB_SIZE, d, 4, (1, core, 1));
    config.block_size = 32;
    let mut model = config.init(&device, 1);
    let mut optim = if env("ADAMW", 0.0) > 0.0 {
        eprintln!("adamw");
        train::run::OptimizerConfig::AdamW {
            beta_1: 0.9,
            beta_2: 0.95,
            epsilon: 1e-8,
            weight_decay: env("WD", 0.0) as f32,
        }
        .init(&model, lr)
    } else {
        EllisAdamConfig::new(lr)
            .with_weight_decay(env("WD", 0.0))
            .init_grouped(&model)
    };
    let schedule = Schedule::Cosine {
        peak_lr: lr,
        warmup: 100,
        total_steps: steps,
        min_lr: lr / 10.0,
    };
    let scheme = if mean == 0 {
        DepthScheme::NonRecurrent
    } else {
        DepthScheme::PoissonLognormalFilling { mean, backprop: 3 }
    };
    let task = ChainTask { seed: 7 };
    let t0 = std::time::Instant::now();
    let test: Vec<_> = (0..256).map(|i| task.example(Split::Test, i)).collect();
    let harder: Vec<_> = (0..256).map(|i| task.example(Split::Harder, i)).collect();
    let mut avg = 0.0;
    for step in 0..steps {
        let ramp = (env("CUR", 0.0) * (steps * bs as u64) as f64) as u64;
        let examples: Vec<_> = (0..bs as u64)
            .map(|i| task.curriculum_example(step * bs as u64 + i, ramp))
            .collect();
        let b = make_batch(&examples, PAD, &device);
        let depth = scheme.sample(3, step);
        let cfg = StepConfig {
            depth,
            lr: schedule.lr(step),
            max_grad_norm: Some(1.0),
            state_seed: step,
            state_scale: env("SCALE", 1.0),
        };
        let (m, r) = train_step(
            model,
            &mut optim,
            &[MicroBatch {
                inputs: b.inputs,
                labels: b.labels,
            }],
            cfg,
        );
        model = m;
        let r = r.unwrap();
        avg = if step == 0 { r.loss } else { 0.98 * avg + 0.02 * r.loss };
        if step % 50 == 49 {
            eprintln!("step {} loss {:.3}", step + 1, avg);
        }
        if step % 250 == 249 || step + 1 == steps {
            let valid = model.valid();
            let dev = Device::flex();
            let tb = make_batch(&test, PAD, &dev);
            let hb = make_batch(&harder, PAD, &dev);
            let mut line = format!(
                "step {} t {:.0}s loss {:.3} |",
                step + 1,
                t0.elapsed().as_secs_f64(),
                avg
            );
            for r in [1, 4, 8, 32] {
                line += &format!(
                    " r{}:{:.2}/{:.2}",
                    r,
                    exact_match(&valid, &tb, r),
                    exact_match(&valid, &hb, r)
                );
            }
            println!("{line}");
        }
    }
}
