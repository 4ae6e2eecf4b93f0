//! The normalised latent states `ln_f(s_i)` of every position after every recurrence step,
//! recorded through the model's own loop (its `observe` hook), never a copy of it.

use model::burn::prelude::*;
use model::{Huginn, InitialState, InputError, NoCache};

/// `latents[i]` is `ln_f(s_i)` for `i = 0..=R` (index 0 is the initial state), each `[S, h]`.
pub struct Trajectory {
    pub latents: Vec<Tensor<2>>,
}

impl Trajectory {
    /// Runs one prompt for `steps` recurrence steps from `init`.
    pub fn capture(model: &Huginn, prompt: &[u32], steps: usize, init: &InitialState) -> Result<Self, InputError> {
        let tokens = model.tokens(&[prompt.to_vec()])?;
        let rotary = model.rotary(0, 1, prompt.len());
        let e = model.embed_prelude(tokens, &rotary, &mut NoCache);
        let s0 = model.initial_state(&e, init);
        let squeeze = |s: Tensor<3>| -> Tensor<2> { s.squeeze_dim(0) };
        let mut latents = vec![squeeze(model.latent(s0.clone()))];
        model.recur(&e, s0, 0..steps, &rotary, &mut NoCache, |_, s| {
            latents.push(squeeze(model.latent(s.clone())))
        });
        Ok(Self { latents })
    }

    /// `‖ln_f(s_i) − target‖` per iteration and position, `[R+1][S]`: how far each token is
    /// from `target` (e.g. the state after a much longer run) at each step.
    pub fn distances_to(&self, target: &Tensor<2>) -> Vec<Vec<f32>> {
        self.latents
            .iter()
            .map(|l| {
                (l.clone() - target.clone())
                    .square()
                    .sum_dim(1)
                    .sqrt()
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .expect("f32 distances")
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::HuginnConfig;

    #[test]
    fn captures_every_iteration_and_measures_distance() {
        let model = HuginnConfig::tiny(30, 16, 2, (1, 1, 1)).init(&Device::flex(), 2);
        let prompt = [1, 2, 3, 4];
        let traj = Trajectory::capture(&model, &prompt, 6, &InitialState::Zeros).unwrap();
        assert_eq!(traj.latents.len(), 7);
        let last = traj.latents[6].clone();
        let want = model
            .forward(model.tokens(&[prompt.to_vec()]).unwrap(), 6)
            .latent
            .squeeze_dim::<2>(0);
        assert_eq!((last.clone() - want).abs().max().into_scalar::<f32>(), 0.0);
        let d = traj.distances_to(&last);
        assert_eq!(d.len(), 7);
        assert!(d[6].iter().all(|x| *x == 0.0));
        assert!(d[0].iter().all(|x| *x > 0.0));
    }
}
