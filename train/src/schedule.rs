//! Learning-rate schedules as pure functions of the optimizer step, so a resumed run gets exactly
//! the rate an uninterrupted one would (nothing to checkpoint).
//!
//! All start with a linear warmup from 0 to the peak (the reference's `it / warmup · peak`), then:
//! `constant` (what the main Huginn run effectively used), `cosine` decay to `min_lr` at
//! `total_steps`, or `trapezoid` (constant, then a linear cooldown to `min_lr` over the last
//! `cooldown` steps).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    Constant {
        peak_lr: f64,
        warmup: u64,
    },
    Cosine {
        peak_lr: f64,
        warmup: u64,
        total_steps: u64,
        min_lr: f64,
    },
    Trapezoid {
        peak_lr: f64,
        warmup: u64,
        total_steps: u64,
        cooldown: u64,
        min_lr: f64,
    },
}

impl Schedule {
    pub fn peak_lr(&self) -> f64 {
        match *self {
            Schedule::Constant { peak_lr, .. }
            | Schedule::Cosine { peak_lr, .. }
            | Schedule::Trapezoid { peak_lr, .. } => peak_lr,
        }
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let (peak, warmup) = match *self {
            Schedule::Constant { peak_lr, warmup }
            | Schedule::Cosine { peak_lr, warmup, .. }
            | Schedule::Trapezoid { peak_lr, warmup, .. } => (peak_lr, warmup),
        };
        if step < warmup {
            return peak * step as f64 / warmup as f64;
        }
        match *self {
            Schedule::Constant { .. } => peak,
            Schedule::Cosine {
                total_steps, min_lr, ..
            } => {
                let span = total_steps.saturating_sub(warmup).max(1);
                let progress = ((step - warmup) as f64 / span as f64).min(1.0);
                min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (peak - min_lr)
            }
            Schedule::Trapezoid {
                total_steps,
                cooldown,
                min_lr,
                ..
            } => {
                let start = total_steps.saturating_sub(cooldown).max(warmup);
                if step < start {
                    peak
                } else {
                    let progress = ((step - start) as f64 / cooldown.max(1) as f64).min(1.0);
                    peak + (min_lr - peak) * progress
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        let s = Schedule::Constant {
            peak_lr: 4e-5,
            warmup: 4096,
        };
        assert_eq!(s.lr(0), 0.0);
        assert!(close(s.lr(1024), 1e-5));
        assert!(close(s.lr(4096), 4e-5));
        assert!(close(s.lr(1_000_000), 4e-5));
    }

    #[test]
    fn cosine_reaches_min_at_the_end_and_half_way_is_the_mean() {
        let s = Schedule::Cosine {
            peak_lr: 1.0,
            warmup: 10,
            total_steps: 110,
            min_lr: 0.1,
        };
        assert!(close(s.lr(10), 1.0));
        assert!(close(s.lr(60), 0.55));
        assert!(close(s.lr(110), 0.1));
        assert!(close(s.lr(500), 0.1));
        assert!((11..110).all(|t| s.lr(t) < s.lr(t - 1)));
    }

    #[test]
    fn trapezoid_holds_then_cools_down_linearly() {
        let s = Schedule::Trapezoid {
            peak_lr: 2.0,
            warmup: 4,
            total_steps: 20,
            cooldown: 8,
            min_lr: 0.0,
        };
        assert!(close(s.lr(2), 1.0));
        assert!((4..=12).all(|t| close(s.lr(t), 2.0)));
        assert!(close(s.lr(16), 1.0));
        assert!(close(s.lr(20), 0.0));
        assert_eq!(s.peak_lr(), 2.0);
    }
}
