use burn::prelude::*;
use model::HuginnConfig;
use train::batch::make_batch;
use train::chains::{ChainTask, PAD, Split, VOCAB_SIZE};
use train::depth::Depth;
use train::step::{MicroBatch, StepConfig, train_step};

fn main() {
    let device = Device::flex().autodiff();
    let mut config = HuginnConfig::tiny(VOCAB_SIZE, 64, 4, (1, 2, 1));
    config.block_size = 32;
    let mut model = config.init(&device, 1);
    let adamw = std::env::var("ADAMW").is_ok();
    let mut optim = if adamw {
        train::run::OptimizerConfig::AdamW {
            beta_1: 0.9,
            beta_2: 0.95,
            epsilon: 1e-8,
            weight_decay: 0.0,
        }
        .init(&model, 1e-3)
    } else {
        train::optim::EllisAdamConfig::new(1e-3).init_grouped(&model)
    };
    let task = ChainTask { seed: 7 };
    for step in 0..5u64 {
        let examples: Vec<_> = (0..32u64).map(|i| task.example(Split::Train, step * 32 + i)).collect();
        let b = make_batch(&examples, PAD, &device);
        let cfg = StepConfig {
            depth: Depth {
                no_grad: 0,
                with_grad: 1,
            },
            lr: 1e-3,
            max_grad_norm: Some(1.0),
            state_seed: step,
            state_scale: 1.0,
        };
        let before = model.wte.val().sum().into_scalar::<f32>();
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
        let after = model.wte.val().sum().into_scalar::<f32>();
        println!(
            "step {step} adamw={adamw} loss {:?} wte sum {before} -> {after}",
            r.map(|r| (r.loss, r.grad_norm))
        );
    }
}
