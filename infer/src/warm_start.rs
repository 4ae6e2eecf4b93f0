//! Where each new token's recurrence starts: the one setting the fixed-depth, adaptive,
//! speculative and diffusion generators share, apart from all of them.

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
