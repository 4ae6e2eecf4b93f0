//! # analysis: latent trajectories of recurrent-depth models
//!
//! So far: capturing the normalised latent state of every token after every recurrence step
//! ([`trajectory`]), the raw material of the paper's orbit plots and convergence heat maps.

pub mod trajectory;
