//! k-hop variable chains (`../shared/spec/experiments.md`, task A): twelve shuffled
//! assignments `dst src` (a source is a variable or a digit), then `? q`, then the digit `q`
//! holds. One chain of `hops` assignments leads from a digit to `q`; the other assignments form
//! distractor chains ending in other digits. Each attention pass resolves about one hop, so the
//! answer needs depth, while the sequence length stays fixed.
//!
//! Each assignment is followed by a separator, `x y ,`, so its two halves are told apart by
//! what precedes them (a separator or the start before a target, the target before a source),
//! not by the parity of their position, which relative position encodings barely expose. A
//! variable is one token wherever it appears, so following a hop is an identity match between
//! the query and an assignment's target. Measured here, both alternatives stall a small model
//! at the guessing level for thousands of steps: bare `x y` pairs (parity), and a separate
//! token for an assigned variable (the model must first learn which assigned token matches
//! which read one).
//!
//! Even so, the content-addressed lookup is not found within the CPU budget: a small model,
//! recurrent or not, stays at the guessing level for thousands of steps, even with one hop
//! and four assignments. [`crate::pointers`] keeps the difficulty knob and makes a hop a
//! relative-offset lookup, which is learned in minutes.

use crate::hops::{HopExample, HopTask, Split};
use crate::rng::SplitMix64;

/// Token ids: digits 0-9 are themselves, the variables follow.
pub const VARIABLES: u32 = 16;
pub const FIRST_VARIABLE: u32 = 10;
pub const QUERY: u32 = FIRST_VARIABLE + VARIABLES;
pub const SEPARATOR: u32 = QUERY + 1;
pub const BOS: u32 = QUERY + 2;
pub const PAD: u32 = QUERY + 3;
pub const VOCAB_SIZE: usize = PAD as usize + 1;
/// Assignments per example.
pub const PAIRS: usize = 12;
/// Tokens per example: BOS, the assignments `x y ,`, `? q`, the answer.
pub const LEN: usize = 1 + 3 * PAIRS + 2 + 1;
/// Training examples ask this many more questions after the first, `? v value` each, about
/// other assigned variables (any hop count). A question costs three tokens against the 40 of
/// the assignments, so each example teaches four answers for 1.2 times the compute; the first
/// question alone is scored in evaluation and sets the example's hop count.
pub const EXTRA_QUERIES: usize = 3;
/// Tokens of a training example.
pub const TRAIN_LEN: usize = LEN + 3 * EXTRA_QUERIES;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainTask {
    pub seed: u64,
}

impl HopTask for ChainTask {
    const TRAIN_HOPS: (usize, usize) = (1, 6);
    const HARDER_HOPS: (usize, usize) = (7, 10);
    const PAD: u32 = PAD;
    const VOCAB_SIZE: usize = VOCAB_SIZE;
    const MAX_LEN: usize = TRAIN_LEN;

    fn seed(&self) -> u64 {
        self.seed
    }

    fn tag(split: Split) -> u64 {
        match split {
            Split::Train => 0x6368_6169_6e00_0001,
            Split::Test => 0x6368_6169_6e00_0002,
            Split::Harder => 0x6368_6169_6e00_0003,
        }
    }

    fn token_name(token: u32) -> String {
        token_name(token)
    }

    fn build(&self, rng: &mut SplitMix64, hops: usize, extra_queries: bool) -> HopExample {
        assert!((1..=PAIRS).contains(&hops), "1..={PAIRS} hops");
        let mut variables: Vec<u32> = (0..VARIABLES).map(|v| FIRST_VARIABLE + v).collect();
        rng.shuffle(&mut variables);
        let mut fresh = variables.into_iter();
        let answer = rng.below(10) as u32;
        // (variable, source, the digit it holds), in chain order.
        let mut pairs = Vec::with_capacity(PAIRS);
        let mut chain = |start: u32, length: usize, pairs: &mut Vec<(u32, u32, u32)>| -> u32 {
            let mut source = start;
            for _ in 0..length {
                let dst = fresh.next().expect("16 variables cover 12 assignments");
                pairs.push((dst, source, start));
                source = dst;
            }
            source
        };
        let query = chain(answer, hops, &mut pairs);
        while pairs.len() < PAIRS {
            let length = 1 + rng.below((PAIRS - pairs.len()).min(6) as u64) as usize;
            let digit = (answer + 1 + rng.below(9) as u32) % 10;
            chain(digit, length, &mut pairs);
        }
        rng.shuffle(&mut pairs);
        let mut tokens = vec![BOS];
        tokens.extend(pairs.iter().flat_map(|(d, s, _)| [*d, *s, SEPARATOR]));
        tokens.extend([QUERY, query, answer]);
        if extra_queries {
            let mut others: Vec<(u32, u32)> = pairs
                .iter()
                .filter(|(d, ..)| *d != query)
                .map(|(d, _, value)| (*d, *value))
                .collect();
            rng.shuffle(&mut others);
            for (variable, value) in others.into_iter().take(EXTRA_QUERIES) {
                tokens.extend([QUERY, variable, value]);
            }
        }
        // The first question's answer, then every third token: the extra questions' answers.
        let answers = (LEN - 1..tokens.len()).step_by(3).collect();
        HopExample {
            tokens,
            answers,
            hops,
            answer,
        }
    }
}

/// A readable name of a token: digits, variables `a`..`p`, `?`, `,`.
pub fn token_name(t: u32) -> String {
    match t {
        0..=9 => t.to_string(),
        _ if (FIRST_VARIABLE..QUERY).contains(&t) => char::from(b'a' + (t - FIRST_VARIABLE) as u8).to_string(),
        QUERY => "?".into(),
        SEPARATOR => ",".into(),
        BOS => "<s>".into(),
        _ => "<pad>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Resolves the variable at `tokens[at]` by following assignments, counting hops.
    fn solve(tokens: &[u32], at: usize) -> (u32, usize) {
        let pairs: HashMap<u32, u32> = tokens[1..1 + 3 * PAIRS]
            .chunks(3)
            .map(|p| {
                assert_eq!(p[2], SEPARATOR);
                (p[0], p[1])
            })
            .collect();
        assert_eq!(pairs.len(), PAIRS, "each variable is assigned once");
        let (mut value, mut hops) = (tokens[at], 0);
        while value >= FIRST_VARIABLE {
            value = pairs[&value];
            hops += 1;
        }
        (value, hops)
    }

    #[test]
    fn answers_follow_the_chain_and_splits_have_their_depths() {
        let task = ChainTask { seed: 11 };
        for (split, lo, hi) in [(Split::Train, 1, 6), (Split::Harder, 7, 10)] {
            let mut seen = [false; 11];
            for i in 0..500 {
                let e = task.example(split, i);
                let len = if split == Split::Train { TRAIN_LEN } else { LEN };
                assert_eq!(e.tokens.len(), len);
                assert_eq!(e.tokens[LEN - 3], QUERY);
                assert_eq!(solve(&e.tokens, LEN - 2), (e.answer, e.hops));
                // The extra questions of training examples are answered right too.
                for q in (LEN..len).step_by(3) {
                    assert_eq!(e.tokens[q], QUERY);
                    assert_ne!(e.tokens[q + 1], e.tokens[LEN - 2]);
                    assert_eq!(solve(&e.tokens, q + 1).0, e.tokens[q + 2]);
                }
                let answers: Vec<usize> = (LEN - 1..len).step_by(3).collect();
                assert_eq!(e.answers, answers, "the question's answer, then each extra one");
                assert_eq!(e.prompt().len(), LEN - 1);
                assert!((lo..=hi).contains(&e.hops));
                seen[e.hops] = true;
            }
            assert!((lo..=hi).all(|h| seen[h]));
        }
        assert_eq!(task.example(Split::Test, 3), task.example(Split::Test, 3));
        assert_ne!(task.example(Split::Test, 3), task.example(Split::Train, 3));
        // The curriculum starts with one hop and ends with the plain distribution.
        assert_eq!(task.curriculum_example(0, 600).hops, 1);
        assert!((0..100).all(|i| task.curriculum_example(i, 600).hops == 1));
        assert!((500..600).any(|i| task.curriculum_example(i, 600).hops == 6));
        assert_eq!(task.curriculum_example(600, 600), task.example(Split::Train, 600));
        assert_eq!(token_name(FIRST_VARIABLE + 2), "c");
        assert_eq!(token_name(SEPARATOR), ",");
        let e = task.example_with_hops(Split::Test, 9, 0);
        assert_eq!(solve(&e.tokens, LEN - 2).1, 9);
    }

    #[test]
    fn distractors_end_in_other_digits() {
        let task = ChainTask { seed: 2 };
        let mut guess_right = 0;
        for i in 0..1000 {
            let e = task.example(Split::Train, i);
            let digits: Vec<u32> = e.tokens[1..1 + 3 * PAIRS].iter().copied().filter(|t| *t < 10).collect();
            assert_eq!(
                digits.iter().filter(|d| **d == e.answer).count(),
                1,
                "one chain starts at the answer"
            );
            // Guessing a digit of the context is right about 1 time in (distinct digits).
            let mut distinct = digits.clone();
            distinct.sort_unstable();
            distinct.dedup();
            guess_right += (e.answer == distinct[i as usize % distinct.len()]) as usize;
        }
        assert!((150..=450).contains(&guess_right), "{guess_right}");
    }
}
