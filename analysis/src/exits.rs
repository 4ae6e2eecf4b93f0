//! Steps-to-exit per token under the exit criteria of adaptive compute, read off a capture:
//! the teacher-forced, per-position counterparts of `infer::exit`'s criteria (the paper's
//! Fig. 10 histograms count exactly this, token by token, under the KL criterion at 5·10⁻⁴).
//!
//! Iteration `i`'s check compares it with iteration `i − 1`; where `infer` compares the first
//! step with a uniform distribution (KL) or `H = 100` (entropy), the capture has the initial
//! state's own read-out to compare with. A token that never satisfies the rule counts `R`.

use crate::capture::Capture;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExitRule {
    /// `KL(p_{i−1} ‖ p_i) < threshold`.
    Kl(f64),
    /// `|H(p_i) − H(p_{i−1})| < threshold`.
    EntropyDiff(f64),
    /// `‖s_i − s_{i−1}‖ / ‖s_i‖ < threshold` on raw states.
    LatentDiff(f64),
    /// The top-1 token unchanged for this many consecutive steps.
    ArgmaxStability(usize),
}

impl ExitRule {
    /// The paper's KL threshold and `infer`'s "auto" thresholds of the others.
    pub const DEFAULTS: [ExitRule; 4] = [
        ExitRule::Kl(5e-4),
        ExitRule::EntropyDiff(1e-3),
        ExitRule::LatentDiff(0.03),
        ExitRule::ArgmaxStability(5),
    ];

    pub fn label(&self) -> String {
        match *self {
            ExitRule::Kl(t) => format!("KL < {t:e}"),
            ExitRule::EntropyDiff(t) => format!("|ΔH| < {t:e}"),
            ExitRule::LatentDiff(t) => format!("latent diff < {t}"),
            ExitRule::ArgmaxStability(n) => format!("top-1 stable {n} steps"),
        }
    }
}

/// For every position of `capture`, the first iteration `i ≥ 1` at which `rule` says "exit",
/// or `R` when it never does.
pub fn exit_steps(capture: &Capture, rule: ExitRule) -> Vec<usize> {
    let (r, s) = (capture.meta.steps, capture.positions());
    let o = &capture.outputs;
    (0..s)
        .map(|t| {
            let mut stable = 0;
            (1..=r)
                .find(|&i| match rule {
                    ExitRule::Kl(threshold) => (o.kl[(i - 1) * s + t] as f64) < threshold,
                    ExitRule::EntropyDiff(threshold) => {
                        ((o.entropy[i * s + t] - o.entropy[(i - 1) * s + t]).abs() as f64) < threshold
                    }
                    ExitRule::LatentDiff(threshold) => (o.residual[(i - 1) * s + t] as f64) < threshold,
                    ExitRule::ArgmaxStability(n) => {
                        stable = if o.top1[i * s + t] == o.top1[(i - 1) * s + t] {
                            stable + 1
                        } else {
                            0
                        };
                        stable >= n
                    }
                })
                .unwrap_or(r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{CaptureMeta, Init};
    use crate::outputs::Outputs;
    use crate::prompt::Prompt;

    /// Two positions, R = 4, with hand-made read-outs.
    fn capture() -> Capture {
        Capture {
            meta: CaptureMeta {
                model: "synthetic".into(),
                prompt: Prompt::from_ids(vec![1, 2]),
                steps: 4,
                init: Init::Zeros,
                reference_steps: None,
                width: 1,
                vocab: 3,
            },
            latents: vec![0.0; 10],
            raw: None,
            reference: None,
            outputs: Outputs {
                // [R+1, S]
                entropy: vec![1.0, 2.0, 0.5, 1.5, 0.4995, 1.0, 0.4990, 0.9995, 0.4989, 0.9991],
                top1: vec![0, 1, 1, 1, 1, 2, 1, 2, 1, 2],
                top1_prob: vec![0.5; 10],
                // [R, S]
                kl: vec![0.1, 0.2, 1e-4, 0.1, 0.01, 1e-5, 1e-6, 1e-6],
                residual: vec![0.5, 0.5, 0.5, 0.02, 0.01, 0.5, 0.01, 0.5],
            },
        }
    }

    #[test]
    fn finds_the_first_step_each_rule_fires_and_caps_at_r() {
        let c = capture();
        assert_eq!(exit_steps(&c, ExitRule::Kl(5e-4)), [2, 3]);
        assert_eq!(exit_steps(&c, ExitRule::EntropyDiff(1e-3)), [2, 3]);
        assert_eq!(exit_steps(&c, ExitRule::LatentDiff(0.03)), [3, 2]);
        assert_eq!(exit_steps(&c, ExitRule::ArgmaxStability(2)), [3, 4]);
        assert_eq!(exit_steps(&c, ExitRule::ArgmaxStability(3)), [4, 4]);
        assert_eq!(ExitRule::Kl(5e-4).label(), "KL < 5e-4");
    }
}
