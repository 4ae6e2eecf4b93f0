//! The paper's three motifs of latent trajectories (Geiping et al. 2025, §7): a token's state
//! settles on a **fixed point**, keeps circling on an **orbit**, or **slides** steadily along a
//! direction. Each trajectory (a token's points in PCA space, iterations `0..=R`) is labelled
//! from its tail, the second half of the iterations, once the initial transient is over.
//!
//! Measured on the tail, in units of the whole trajectory's extent `E` (the largest distance of
//! any point from the trajectory's centre of mass), so the rule is scale-free:
//!
//! * `motion` = tail path length / `E`: how much it still moves;
//! * `steadiness` = path length of the tail's second half / that of its first half: about 1
//!   for motion that keeps up, near 0 for motion that is dying out (geometric convergence);
//! * `straightness` = net displacement over the tail / tail path length: 1 for a straight
//!   drift, near 0 for motion that comes back on itself;
//! * `radius` = mean distance of the tail from its own centre / `E`, and `turns` = the net
//!   angle swept around that centre in the tail's own principal plane, in revolutions:
//!   reported to describe orbits, not used by the rule.
//!
//! The rule, in order: `motion` < [`FIXED_MOTION`] or `steadiness` < [`STEADY`] → fixed
//! point (converged, or converging); `straightness` ≥ [`SLIDER_STRAIGHTNESS`] → slider;
//! otherwise → orbit (it keeps moving without going anywhere: cycles of any period, including
//! the back-and-forth oscillation of period 2).

use serde::{Deserialize, Serialize};

use crate::linalg::symmetric_eigen;

/// Below this much tail motion (relative to the extent) the token has stopped moving.
pub const FIXED_MOTION: f64 = 0.05;
/// Below this ratio of late to early tail motion the movement is dying out.
pub const STEADY: f64 = 0.5;
/// At or above this net displacement per path length the tail is a drift, not a cycle.
pub const SLIDER_STRAIGHTNESS: f64 = 0.6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Motif {
    FixedPoint,
    Orbit,
    Slider,
}

impl Motif {
    pub const ALL: [Motif; 3] = [Motif::FixedPoint, Motif::Orbit, Motif::Slider];

    pub fn name(self) -> &'static str {
        match self {
            Motif::FixedPoint => "fixed point",
            Motif::Orbit => "orbit",
            Motif::Slider => "slider",
        }
    }
}

/// A trajectory's label and the measurements behind it (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Dynamics {
    pub motif: Motif,
    pub motion: f64,
    pub steadiness: f64,
    pub straightness: f64,
    pub radius: f64,
    pub turns: f64,
}

/// Labels the trajectory through `points` (iterations in order, any dimension).
pub fn classify(points: &[Vec<f32>]) -> Dynamics {
    let points: Vec<Vec<f64>> = points.iter().map(|p| p.iter().map(|&x| x as f64).collect()).collect();
    let still = Dynamics {
        motif: Motif::FixedPoint,
        motion: 0.0,
        steadiness: 0.0,
        straightness: 0.0,
        radius: 0.0,
        turns: 0.0,
    };
    let centre = mean(&points);
    let extent = points.iter().map(|p| distance(p, &centre)).fold(0.0, f64::max);
    if extent == 0.0 || points.len() < 3 {
        return still;
    }
    let tail = &points[(points.len() - 1) / 2..];
    let path = |ps: &[Vec<f64>]| ps.windows(2).map(|w| distance(&w[0], &w[1])).sum::<f64>();
    let length = path(tail);
    if length == 0.0 {
        return still;
    }
    let half = tail.len() / 2;
    let early = path(&tail[..=half]);
    let late = path(&tail[half..]);
    let tail_centre = mean(tail);
    let motion = length / extent;
    let steadiness = if early > 0.0 { late / early } else { 1.0 };
    let straightness = distance(&tail[0], &tail[tail.len() - 1]) / length;
    let motif = if motion < FIXED_MOTION || steadiness < STEADY {
        Motif::FixedPoint
    } else if straightness >= SLIDER_STRAIGHTNESS {
        Motif::Slider
    } else {
        Motif::Orbit
    };
    Dynamics {
        motif,
        motion,
        steadiness,
        straightness,
        radius: tail.iter().map(|p| distance(p, &tail_centre)).sum::<f64>() / tail.len() as f64 / extent,
        turns: turns(tail, &tail_centre),
    }
}

/// Net revolutions of `points` around `centre`, measured in their own principal plane.
fn turns(points: &[Vec<f64>], centre: &[f64]) -> f64 {
    let d = centre.len();
    if d < 2 {
        return 0.0;
    }
    let centred: Vec<Vec<f64>> = points
        .iter()
        .map(|p| p.iter().zip(centre).map(|(a, c)| a - c).collect())
        .collect();
    let covariance: Vec<Vec<f64>> = (0..d)
        .map(|i| (0..d).map(|j| centred.iter().map(|p| p[i] * p[j]).sum()).collect())
        .collect();
    let plane = symmetric_eigen(&covariance).vectors;
    let dot = |p: &[f64], v: &[f64]| p.iter().zip(v).map(|(a, b)| a * b).sum::<f64>();
    let angles: Vec<f64> = centred
        .iter()
        .map(|p| dot(p, &plane[1]).atan2(dot(p, &plane[0])))
        .collect();
    let swept: f64 = angles
        .windows(2)
        .map(|w| {
            let delta = w[1] - w[0];
            (delta + std::f64::consts::PI).rem_euclid(std::f64::consts::TAU) - std::f64::consts::PI
        })
        .sum();
    swept.abs() / std::f64::consts::TAU
}

fn mean(points: &[Vec<f64>]) -> Vec<f64> {
    let d = points[0].len();
    (0..d)
        .map(|j| points.iter().map(|p| p[j]).sum::<f64>() / points.len() as f64)
        .collect()
}

fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt()
}

/// How many trajectories carry each motif, every motif listed.
pub fn counts(labels: impl IntoIterator<Item = Motif>) -> Vec<(Motif, usize)> {
    let mut counts: Vec<(Motif, usize)> = Motif::ALL.iter().map(|&m| (m, 0)).collect();
    for label in labels {
        counts
            .iter_mut()
            .find(|(m, _)| *m == label)
            .expect("every motif listed")
            .1 += 1;
    }
    counts
}

/// `counts` as text for titles and captions: `fixed point 3 · orbit 7 · slider 0`.
pub fn summary(counts: &[(Motif, usize)]) -> String {
    counts
        .iter()
        .map(|(m, c)| format!("{} {c}", m.name()))
        .collect::<Vec<_>>()
        .join(" · ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic jitter in [-1, 1].
    fn jitter(i: usize, j: usize) -> f32 {
        (((i * 7919 + j * 104_729) % 1000) as f32 / 500.0) - 1.0
    }

    /// A transient from `start` decaying into `settle(i)`, in 3-D.
    fn trajectory(steps: usize, settle: impl Fn(usize) -> [f32; 3]) -> Vec<Vec<f32>> {
        (0..=steps)
            .map(|i| {
                let decay = 0.7f32.powi(i as i32);
                let s = settle(i);
                (0..3)
                    .map(|j| s[j] + 10.0 * decay * (1.0 + 0.3 * jitter(i, j)))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn labels_synthetic_fixed_points_orbits_and_sliders() {
        let fixed = trajectory(64, |_| [1.0, 2.0, 3.0]);
        let d = classify(&fixed);
        assert_eq!(d.motif, Motif::FixedPoint, "{d:?}");
        assert!(d.motion < 1e-3);

        // Slow geometric convergence that is still visibly moving: converging, so fixed.
        let spiral: Vec<Vec<f32>> = (0..=64)
            .map(|i: i32| {
                let r = 5.0 * 0.93f32.powi(i);
                vec![r * (0.5 * i as f32).cos(), r * (0.5 * i as f32).sin(), 0.0]
            })
            .collect();
        let d = classify(&spiral);
        assert_eq!(d.motif, Motif::FixedPoint, "{d:?}");
        assert!(d.motion > FIXED_MOTION && d.steadiness < STEADY);

        let orbit = trajectory(64, |i| {
            let a = 0.4 * i as f32;
            [2.0 * a.cos(), 2.0 * a.sin(), 0.1 * a.sin()]
        });
        let d = classify(&orbit);
        assert_eq!(d.motif, Motif::Orbit, "{d:?}");
        // 32 tail steps of 0.4 rad: about two revolutions.
        assert!((d.turns - 32.0 * 0.4 / std::f64::consts::TAU).abs() < 0.1, "{d:?}");
        assert!(d.radius > 0.1);

        let oscillation = trajectory(64, |i| if i % 2 == 0 { [1.0, 0.0, 0.0] } else { [-1.0, 0.5, 0.0] });
        assert_eq!(classify(&oscillation).motif, Motif::Orbit);

        let slider = trajectory(64, |i| [0.2 * i as f32, -0.1 * i as f32, 0.02 * jitter(i, 5)]);
        let d = classify(&slider);
        assert_eq!(d.motif, Motif::Slider, "{d:?}");
        assert!(d.straightness > 0.9 && d.steadiness > 0.9, "{d:?}");
    }

    #[test]
    fn degenerate_trajectories_are_fixed_points() {
        let still: Vec<Vec<f32>> = std::iter::repeat_n(vec![1.0, 2.0], 10).collect();
        assert_eq!(classify(&still).motif, Motif::FixedPoint);
        assert_eq!(classify(&[vec![0.0], vec![1.0]]).motif, Motif::FixedPoint);
        // One dimension: no plane to turn in, but a steady drift is still a slider.
        let line: Vec<Vec<f32>> = (0..20).map(|i| vec![i as f32]).collect();
        let d = classify(&line);
        assert_eq!((d.motif, d.turns), (Motif::Slider, 0.0));
    }

    #[test]
    fn counts_every_motif() {
        let c = counts([Motif::Orbit, Motif::FixedPoint, Motif::Orbit]);
        assert_eq!(c, [(Motif::FixedPoint, 1), (Motif::Orbit, 2), (Motif::Slider, 0)]);
        assert_eq!(summary(&c), "fixed point 1 · orbit 2 · slider 0");
    }
}
