//! Greedy decoding at a fixed recurrence depth (the reference's `generate_minimal`): the
//! adaptive generator with the criterion that never exits.

use model::{Huginn, InputError};

use crate::adaptive::{self, AdaptiveConfig};
use crate::strategy::Strategy;
use crate::warm_start::WarmStart;

/// New tokens and the recurrence steps spent on each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub steps_per_token: Vec<usize>,
}

/// Greedily generates `max_new` tokens after `prompt`, each with `steps` recurrence steps,
/// through the complete cache.
pub fn generate(
    model: &Huginn,
    prompt: &[u32],
    max_new: usize,
    steps: usize,
    warm: WarmStart,
) -> Result<Generation, InputError> {
    let out = adaptive::generate(
        model,
        prompt,
        max_new,
        AdaptiveConfig::fixed(steps, warm, Strategy::default()),
    )?;
    Ok(Generation {
        tokens: out.tokens,
        steps_per_token: out.steps_per_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::argmax;
    use model::HuginnConfig;
    use model::burn::prelude::*;

    #[test]
    fn cached_decoding_equals_recomputing_the_whole_sequence() {
        let device = Device::flex();
        let model = HuginnConfig::tiny(60, 32, 4, (1, 2, 1)).init(&device, 21);
        let prompt = vec![5, 9, 14, 2];
        let generated = generate(&model, &prompt, 6, 3, WarmStart::Cold).unwrap();
        let mut sequence = prompt.clone();
        for &token in &generated.tokens {
            let logits = model.forward(model.tokens(&[sequence.clone()]).unwrap(), 3).logits;
            let last: Vec<f32> = logits
                .narrow(1, sequence.len() - 1, 1)
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap();
            assert_eq!(argmax(&last) as u32, token);
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
            err.to_string().contains(
                "a prompt of 3 tokens and 254 new ones need 257 positions, more than the context length of 256"
            ),
            "{err}"
        );
    }
}
