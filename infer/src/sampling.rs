//! Choosing the next token from logits, in the order the reference's sampler applies its
//! filters: repetition penalty, temperature, top-k, top-p, min-p, then a seeded draw (greedy
//! argmax when sampling is off).

use folder::generation_config::GenerationConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::exit::argmax;
use crate::range::{OutOfRange, within};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// `0` = greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    /// Drop tokens whose probability is below `min_p` times the top probability.
    pub min_p: Option<f32>,
    /// `> 1` discourages tokens already in the sequence (CTRL/HF rule: positive logits are
    /// divided by it, negative ones multiplied).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// The sampler a folder's `generation_config.json` describes, with `transformers`' own
    /// defaults for fields left out when sampling (temperature 1, top-k 50); top-k 0 means no
    /// top-k there.
    pub fn from_generation_config(defaults: &GenerationConfig, seed: u64) -> Self {
        Self {
            temperature: if defaults.do_sample {
                defaults.temperature.unwrap_or(1.0)
            } else {
                0.0
            },
            top_k: match defaults.top_k {
                Some(0) => None,
                Some(k) => Some(k),
                None => defaults.do_sample.then_some(50),
            },
            top_p: defaults.top_p,
            min_p: defaults.min_p,
            repetition_penalty: defaults.repetition_penalty.unwrap_or(1.0),
            seed,
        }
    }
}

/// The highest temperature: beyond it every distribution is uniform to within f32's precision
/// of the logits that produce it.
pub const MAX_TEMPERATURE: f32 = 100.0;

/// The repetition penalty's range: `1/100..=100` already moves a logit of 10 past any other.
pub const REPETITION_PENALTY: (f32, f32) = (0.01, 100.0);

impl SamplingConfig {
    /// Checks the values a user can get wrong, for a vocabulary of `vocab` tokens.
    pub fn check(&self, vocab: usize) -> Result<(), OutOfRange> {
        let t = self.temperature;
        if !(t.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&t)) {
            return Err(OutOfRange::new("temperature", format!("in [0, {MAX_TEMPERATURE}]"), t));
        }
        if let Some(k) = self.top_k {
            within("top_k", k, 1, vocab)?;
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(OutOfRange::new("top_p", "in (0, 1]", p));
        }
        if let Some(p) = self.min_p
            && !(0.0..=1.0).contains(&p)
        {
            return Err(OutOfRange::new("min_p", "in [0, 1]", p));
        }
        let (low, high) = REPETITION_PENALTY;
        let penalty = self.repetition_penalty;
        if !(low..=high).contains(&penalty) {
            return Err(OutOfRange::new(
                "repetition_penalty",
                format!("in [{low}, {high}]"),
                penalty,
            ));
        }
        Ok(())
    }

    /// [`Self::check`] without a vocabulary, as a message.
    pub fn validate(&self) -> Result<(), String> {
        self.check(usize::MAX)
            .map_err(|e| format!("invalid sampling setting: {e}"))
    }
}

/// A seeded sampler; one per sequence so every sequence's draws are reproducible.
pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            config,
        }
    }

    /// The next token given the last position's logits and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        let penalty = self.config.repetition_penalty;
        if penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
        if self.config.temperature == 0.0 {
            return argmax(&logits) as u32;
        }
        let probs = self.filtered_probabilities(&logits);
        let mut draw: f64 = self.rng.random::<f64>() * probs.iter().sum::<f64>();
        for (i, p) in probs.iter().enumerate() {
            draw -= p;
            if draw < 0.0 && *p > 0.0 {
                return i as u32;
            }
        }
        // Rounding left the draw at the very end: the last kept token.
        probs.iter().rposition(|p| *p > 0.0).unwrap_or(0) as u32
    }

    /// Softmax of `logits / temperature` with the top-k, top-p and min-p filters applied
    /// (unnormalised: removed tokens are 0).
    fn filtered_probabilities(&self, logits: &[f32]) -> Vec<f64> {
        let t = self.config.temperature as f64;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<f64> = logits.iter().map(|l| ((*l as f64 - max) / t).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]));
        if let Some(k) = self.config.top_k {
            order.iter().skip(k).for_each(|&i| probs[i] = 0.0);
        }
        if let Some(top_p) = self.config.top_p {
            let mut mass = 0.0;
            for &i in &order {
                if mass >= top_p as f64 {
                    probs[i] = 0.0;
                } else {
                    mass += probs[i];
                }
            }
        }
        if let Some(min_p) = self.config.min_p {
            let top = probs[order[0]];
            probs
                .iter_mut()
                .filter(|p| **p < min_p as f64 * top)
                .for_each(|p| *p = 0.0);
        }
        probs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_configs_sample_as_transformers_reads_them() {
        let released = GenerationConfig::from_json(r#"{"bos_token_id": 65504, "eos_token_id": 65505}"#).unwrap();
        assert_eq!(
            SamplingConfig::from_generation_config(&released, 0),
            SamplingConfig::default(),
            "greedy"
        );
        let sampled = GenerationConfig::from_json(r#"{"do_sample": true, "temperature": 0.7}"#).unwrap();
        let sampling = SamplingConfig::from_generation_config(&sampled, 3);
        assert_eq!(
            (sampling.temperature, sampling.top_k, sampling.seed),
            (0.7, Some(50), 3)
        );
        let no_top_k = GenerationConfig::from_json(r#"{"do_sample": true, "top_k": 0}"#).unwrap();
        let sampling = SamplingConfig::from_generation_config(&no_top_k, 0);
        assert_eq!((sampling.temperature, sampling.top_k), (1.0, None));
    }

    fn frequencies(config: SamplingConfig, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut sampler = Sampler::new(config);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits, &[]) as usize] += 1;
        }
        counts.iter().map(|c| *c as f64 / draws as f64).collect()
    }

    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let e: Vec<f64> = logits.iter().map(|l| (*l as f64 / t).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    const LOGITS: [f32; 5] = [2.0, 1.0, 0.5, 0.0, -1.0];

    #[test]
    fn greedy_is_argmax_and_sampling_follows_the_softmax() {
        assert_eq!(Sampler::new(SamplingConfig::default()).sample(&LOGITS, &[]), 0);
        for t in [1.0f32, 0.5, 2.0] {
            let config = SamplingConfig {
                temperature: t,
                seed: 3,
                ..Default::default()
            };
            let freq = frequencies(config, &LOGITS, 40_000);
            for (f, p) in freq.iter().zip(softmax(&LOGITS, t as f64)) {
                // 5 standard errors of a binomial proportion at n = 40000.
                assert!(
                    (f - p).abs() < 5.0 * (p * (1.0 - p) / 40_000.0).sqrt() + 1e-9,
                    "T={t}: {freq:?}"
                );
            }
        }
    }

    #[test]
    fn filters_keep_only_what_they_should() {
        let base = SamplingConfig {
            temperature: 1.0,
            seed: 5,
            ..Default::default()
        };
        let top_k = frequencies(SamplingConfig { top_k: Some(2), ..base }, &LOGITS, 5000);
        assert!(top_k[2..].iter().all(|f| *f == 0.0) && top_k[0] > top_k[1] && top_k[1] > 0.0);
        // softmax(LOGITS) ≈ [0.55, 0.20, 0.12, 0.07, 0.03]: top-p 0.7 keeps the first two.
        let top_p = frequencies(
            SamplingConfig {
                top_p: Some(0.7),
                ..base
            },
            &LOGITS,
            5000,
        );
        assert!(top_p[2..].iter().all(|f| *f == 0.0) && top_p[1] > 0.0);
        // min-p 0.2: p ≥ 0.2·0.55 = 0.11 keeps the first three.
        let min_p = frequencies(
            SamplingConfig {
                min_p: Some(0.2),
                ..base
            },
            &LOGITS,
            5000,
        );
        assert!(min_p[3..].iter().all(|f| *f == 0.0) && min_p[2] > 0.0);
    }

    #[test]
    fn repetition_penalty_and_seeds() {
        let greedy = SamplingConfig {
            repetition_penalty: 3.0,
            ..Default::default()
        };
        assert_eq!(Sampler::new(greedy).sample(&LOGITS, &[]), 0);
        assert_eq!(
            Sampler::new(greedy).sample(&LOGITS, &[0]),
            1,
            "2/3 < 1: the seen token loses"
        );
        let seeded = |seed| {
            frequencies(
                SamplingConfig {
                    temperature: 1.0,
                    seed,
                    ..Default::default()
                },
                &LOGITS,
                50,
            )
        };
        assert_eq!(seeded(9), seeded(9));
        assert!(
            SamplingConfig {
                top_p: Some(1.5),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            SamplingConfig {
                temperature: -1.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(SamplingConfig::default().validate().is_ok());
    }
}
