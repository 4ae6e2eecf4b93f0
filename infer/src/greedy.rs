//! Greedy decoding at a fixed recurrence depth through a complete cache: the plain generator
//! (the reference's `generate_minimal` with the `full` lookup). It is the oracle the optimised
//! engine is tested against, and is exact on the reference fixtures.

use model::burn::prelude::*;
use model::{FullCache, Huginn, InitialState, InputError};

/// Where each new token's recurrence starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WarmStart {
    /// From zeros, like the prompt.
    #[default]
    Cold,
    /// From the previous token's final state after `ln_f` (what the reference's
    /// `generate_minimal` carries when `continuous_compute=True`).
    Normalized,
    /// From the previous token's raw final state (the paper's definition of continuous CoT,
    /// and the reference's adaptive generator).
    Raw,
}

/// New tokens and the recurrence steps spent on each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub steps_per_token: Vec<usize>,
}

/// Greedily generates `max_new` tokens after `prompt`, each with `steps` recurrence steps.
pub fn generate(
    model: &Huginn,
    prompt: &[u32],
    max_new: usize,
    steps: usize,
    warm: WarmStart,
) -> Result<Generation, InputError> {
    let context = model.config().block_size;
    if prompt.len() + max_new > context {
        return Err(InputError::TooLong {
            len: prompt.len() + max_new,
            context,
        });
    }
    let mut cache = FullCache::new();
    let mut input = model.tokens(&[prompt.to_vec()])?;
    let mut position = 0;
    let mut init = InitialState::Zeros;
    let mut out = Generation {
        tokens: Vec::new(),
        steps_per_token: Vec::new(),
    };
    while out.tokens.len() < max_new {
        let len = input.dims()[1];
        let pass = model.forward_with(input, steps, &init, position, &mut cache, |_, _| {});
        position += len;
        let last = |t: Tensor<3>| t.narrow(1, len - 1, 1);
        let next = argmax(last(pass.logits));
        out.tokens.push(next);
        out.steps_per_token.push(steps);
        init = match warm {
            WarmStart::Cold => InitialState::Zeros,
            WarmStart::Normalized => InitialState::Given(last(pass.latent)),
            WarmStart::Raw => InitialState::Given(last(pass.state)),
        };
        input = model.tokens(&[vec![next]])?;
    }
    Ok(out)
}

fn argmax(logits: Tensor<3>) -> u32 {
    let values: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 logits");
    // First maximum, as torch.argmax picks.
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::HuginnConfig;

    #[test]
    fn cached_decoding_equals_recomputing_the_whole_sequence() {
        let device = Device::flex();
        let model = HuginnConfig::tiny(60, 32, 4, (1, 2, 1)).init(&device, 21);
        let prompt = vec![5, 9, 14, 2];
        let generated = generate(&model, &prompt, 6, 3, WarmStart::Cold).unwrap();
        let mut sequence = prompt.clone();
        for &token in &generated.tokens {
            let logits = model.forward(model.tokens(&[sequence.clone()]).unwrap(), 3).logits;
            assert_eq!(argmax(logits.narrow(1, sequence.len() - 1, 1)), token);
            sequence.push(token);
        }
        assert_eq!(generated.steps_per_token, [3; 6]);
    }

    #[test]
    fn warm_starts_change_the_trajectory_and_context_is_enforced() {
        let device = Device::flex();
        let model = HuginnConfig::tiny(60, 32, 4, (1, 2, 1)).init(&device, 22);
        let prompt = [1, 2, 3];
        let cold = generate(&model, &prompt, 8, 2, WarmStart::Cold).unwrap();
        let warm = generate(&model, &prompt, 8, 2, WarmStart::Raw).unwrap();
        assert_eq!(cold.tokens[0], warm.tokens[0], "the prompt pass is the same");
        assert_ne!(cold.tokens, warm.tokens);
        let err = generate(&model, &prompt, 254, 1, WarmStart::Cold).unwrap_err();
        assert!(
            err.to_string().contains("257 tokens exceeds the context length of 256"),
            "{err}"
        );
    }
}
