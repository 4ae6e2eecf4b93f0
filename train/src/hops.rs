//! What the two hop-count tasks share: k-hop variable chains ([`crate::chains`]) and k-hop
//! pointer chains ([`crate::pointers`]) both ask for one digit at the end of a chain of `hops`
//! references, at a sequence length that does not depend on `hops`. So both have the same
//! splits (training hops, and deeper chains held out), the same curriculum over hops, and the
//! same way of deriving example `i` of a split from `(seed, split, i)` alone.

use crate::rng::SplitMix64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training hops.
    Train,
    /// The training hops, other examples.
    Test,
    /// More hops than anything trained, at the same sequence length.
    Harder,
}

/// One question: its tokens, where its scored answers are, and its depth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopExample {
    pub tokens: Vec<u32>,
    /// Indices in `tokens` of the answers that are scored (the first is the question's).
    pub answers: Vec<usize>,
    /// Hops of the question, and its answer (at `tokens[answers[0]]`).
    pub hops: usize,
    pub answer: u32,
}

impl HopExample {
    /// The tokens before the question's answer: what a model is prompted with.
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.answers[0]]
    }
}

/// A task whose difficulty is a hop count. Implementors build one example; the splits, the
/// curriculum and the per-index seeding are shared.
pub trait HopTask {
    /// Inclusive hop ranges of the training distribution and of the harder split.
    const TRAIN_HOPS: (usize, usize);
    const HARDER_HOPS: (usize, usize);
    /// The padding token and the vocabulary.
    const PAD: u32;
    const VOCAB_SIZE: usize;
    /// Tokens of the longest example (a training one).
    const MAX_LEN: usize;

    fn seed(&self) -> u64;
    /// A per-task, per-split constant mixed into the seed, so the splits (and the tasks) draw
    /// unrelated examples.
    fn tag(split: Split) -> u64;
    /// An example with exactly `hops` hops (`training` ones may carry extra scored questions).
    fn build(&self, rng: &mut SplitMix64, hops: usize, training: bool) -> HopExample;
    /// A readable name of a token.
    fn token_name(token: u32) -> String;

    fn hops(split: Split) -> (usize, usize) {
        match split {
            Split::Train | Split::Test => Self::TRAIN_HOPS,
            Split::Harder => Self::HARDER_HOPS,
        }
    }

    /// Example `index` of `split`, its hop count uniform in the split's range.
    fn example(&self, split: Split, index: u64) -> HopExample {
        let (lo, hi) = Self::hops(split);
        let mut rng = self.rng(split, index);
        let hops = lo + rng.below((hi - lo + 1) as u64) as usize;
        self.build(&mut rng, hops, split == Split::Train)
    }

    /// Training example `index` under a curriculum: the most hops grows linearly over the
    /// first `ramp` examples from the fewest training hops to the most, then stays there (the
    /// plain training distribution). Short chains first let the model find the one-hop lookup,
    /// the step every longer chain repeats, before deeper chains are mixed in.
    fn curriculum_example(&self, index: u64, ramp: u64) -> HopExample {
        if index >= ramp {
            return self.example(Split::Train, index);
        }
        let (lo, hi) = Self::TRAIN_HOPS;
        let span = (hi - lo + 1) as u64;
        let most = (1 + span * index / ramp).min(span);
        let mut rng = self.rng(Split::Train, index);
        let hops = lo + rng.below(most) as usize;
        self.build(&mut rng, hops, true)
    }

    /// Example `index` of `split` with exactly `hops` hops (for accuracy by difficulty).
    fn example_with_hops(&self, split: Split, hops: usize, index: u64) -> HopExample {
        let mut rng = self.rng(split, index ^ ((hops as u64) << 56));
        self.build(&mut rng, hops, split == Split::Train)
    }

    fn rng(&self, split: Split, index: u64) -> SplitMix64 {
        SplitMix64(self.seed() ^ Self::tag(split) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }
}
