//! k-hop pointer chains: a tape of cells, each a digit or a back-pointer `<d` ("the value of
//! the cell `d` places back"), and the question is the value of the last cell. Its pointer,
//! then the pointer of the cell it lands on, and so on, are followed until a digit: `hops`
//! pointers in all. The next token after the tape is the answer.
//!
//! Why this task beside the variable chains: it has the same difficulty knob (hops, at a fixed
//! length), but a hop is a lookup at a relative offset named by the current token, which a
//! RoPE attention head expresses directly, so the one-hop step is found within a few hundred
//! steps where content-addressed variables stall for thousands. And a hop has the shape of
//! the core's update with input injection: every cell's latent state becomes the state of the
//! cell its own (injected) token points at, so one more iteration resolves one more hop
//! everywhere on the tape, and deeper chains than any trained are answered by iterating more.
//!
//! Distractors: every cell off the chain is a digit or a valid pointer with equal odds, so
//! the tape holds about eighteen digits and other chains ending in them.

use crate::hops::{HopExample, HopTask, Split};
use crate::rng::SplitMix64;

/// Farthest a pointer reaches back.
pub const MAX_BACK: u32 = 3;
/// Token ids: digits 0-9 are themselves, then the pointers `<1`..`<MAX_BACK`.
pub const FIRST_POINTER: u32 = 10;
pub const BOS: u32 = FIRST_POINTER + MAX_BACK;
pub const PAD: u32 = BOS + 1;
pub const VOCAB_SIZE: usize = PAD as usize + 1;
/// Cells on the tape: room for the deepest harder chain (every pointer reaching back
/// `MAX_BACK` cells) and its answer.
pub const CELLS: usize = 1 + MAX_BACK as usize * <PointerTask as HopTask>::HARDER_HOPS.1;
/// Tokens per example: BOS, the cells, the answer.
pub const LEN: usize = 1 + CELLS + 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointerTask {
    pub seed: u64,
}

impl HopTask for PointerTask {
    const TRAIN_HOPS: (usize, usize) = (1, 10);
    const HARDER_HOPS: (usize, usize) = (11, 13);
    const PAD: u32 = PAD;
    const VOCAB_SIZE: usize = VOCAB_SIZE;
    const MAX_LEN: usize = LEN;

    fn seed(&self) -> u64 {
        self.seed
    }

    fn tag(split: Split) -> u64 {
        match split {
            Split::Train => 0x706f_696e_7400_0001,
            Split::Test => 0x706f_696e_7400_0002,
            Split::Harder => 0x706f_696e_7400_0003,
        }
    }

    fn token_name(token: u32) -> String {
        token_name(token)
    }

    fn build(&self, rng: &mut SplitMix64, hops: usize, _training: bool) -> HopExample {
        assert!(
            (1..CELLS).contains(&hops),
            "1..{CELLS} hops fit on a tape of {CELLS} cells"
        );
        // The chain, from the last cell back: `hops` pointers, each reaching back 1..=MAX_BACK
        // cells but never so far that the pointers still to come fall off the tape (a bound
        // that only binds beyond the harder split's hops), then the answer digit where it lands.
        let mut cells = vec![None; CELLS];
        let mut at = CELLS - 1;
        for left in (0..hops).rev() {
            let reach = (MAX_BACK as usize).min(at - left);
            let back = 1 + rng.below(reach as u64) as usize;
            cells[at] = Some(FIRST_POINTER + back as u32 - 1);
            at -= back;
        }
        let end = at;
        let answer = rng.below(10) as u32;
        cells[end] = Some(answer);
        // Everything else: a digit or a pointer that stays on the tape, with equal odds.
        for (i, cell) in cells.iter_mut().enumerate() {
            if cell.is_none() {
                let reach = (i as u64).min(MAX_BACK as u64);
                *cell = Some(if reach > 0 && rng.below(2) == 0 {
                    FIRST_POINTER + rng.below(reach) as u32
                } else {
                    rng.below(10) as u32
                });
            }
        }
        let mut tokens = vec![BOS];
        tokens.extend(cells.into_iter().map(|c| c.expect("every cell is filled")));
        tokens.push(answer);
        HopExample {
            tokens,
            answers: vec![LEN - 1],
            hops,
            answer,
        }
    }
}

/// A readable name of a token: digits, pointers `<1`..`<3`.
pub fn token_name(t: u32) -> String {
    match t {
        0..=9 => t.to_string(),
        _ if (FIRST_POINTER..BOS).contains(&t) => format!("<{}", t - FIRST_POINTER + 1),
        BOS => "<s>".into(),
        _ => "<pad>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Follows the pointers from the last cell: (the digit reached, pointers followed).
    fn solve(tokens: &[u32]) -> (u32, usize) {
        let cells = &tokens[1..1 + CELLS];
        let (mut at, mut hops) = (CELLS - 1, 0);
        while cells[at] >= FIRST_POINTER {
            let back = (cells[at] - FIRST_POINTER + 1) as usize;
            at = at.checked_sub(back).expect("pointers stay on the tape");
            hops += 1;
        }
        (cells[at], hops)
    }

    #[test]
    fn answers_follow_the_pointers_and_splits_have_their_depths() {
        let task = PointerTask { seed: 5 };
        for split in [Split::Train, Split::Test, Split::Harder] {
            let (lo, hi) = PointerTask::hops(split);
            let mut seen = [false; CELLS];
            for i in 0..500 {
                let e = task.example(split, i);
                assert_eq!(e.tokens.len(), LEN);
                assert_eq!(e.tokens[0], BOS);
                assert_eq!(e.answers, [LEN - 1]);
                assert_eq!(e.tokens[LEN - 1], e.answer);
                assert_eq!(solve(&e.tokens), (e.answer, e.hops));
                // Every cell, on the chain or not, is a digit or a pointer that stays on the tape.
                for (i, &c) in e.tokens[1..1 + CELLS].iter().enumerate() {
                    assert!(c < 10 || (c >= FIRST_POINTER && ((c - FIRST_POINTER + 1) as usize) <= i));
                }
                assert!((lo..=hi).contains(&e.hops));
                seen[e.hops] = true;
            }
            assert!((lo..=hi).all(|h| seen[h]), "{split:?}");
        }
        assert_eq!(task.example(Split::Test, 3), task.example(Split::Test, 3));
        assert_ne!(task.example(Split::Test, 3), task.example(Split::Train, 3));
        assert_ne!(
            task.example(Split::Test, 3),
            PointerTask { seed: 6 }.example(Split::Test, 3)
        );
        // The deepest chain that fits: every pointer `<1`, back to the first cell.
        for hops in 1..CELLS {
            let e = task.example_with_hops(Split::Harder, hops, 0);
            assert_eq!(solve(&e.tokens), (e.answer, hops));
        }
        // The curriculum starts with one hop and ends with the plain distribution.
        let most = PointerTask::TRAIN_HOPS.1;
        assert!((0..600 / most as u64).all(|i| task.curriculum_example(i, 600).hops == 1));
        assert!((500..600).any(|i| task.curriculum_example(i, 600).hops == most));
        assert_eq!(task.curriculum_example(600, 600), task.example(Split::Train, 600));
        assert_eq!(token_name(FIRST_POINTER + 2), "<3");
        assert_eq!(token_name(7), "7");
    }

    #[test]
    fn the_answer_is_not_given_away_by_the_tape() {
        // Distractors: digits are common, and the answer is rarely the nearest one, so neither
        // "some digit" nor "the last digit" is a way around following the pointers.
        let task = PointerTask { seed: 9 };
        let (mut digits, mut last_digit_right) = (0, 0);
        for i in 0..1000 {
            let e = task.example(Split::Test, i);
            let cells = &e.tokens[1..1 + CELLS];
            digits += cells.iter().filter(|c| **c < 10).count();
            let last = cells
                .iter()
                .rev()
                .find(|c| **c < 10)
                .expect("the answer is on the tape");
            last_digit_right += (*last == e.answer) as usize;
        }
        assert!((12_000..24_000).contains(&digits), "{digits} digits in 1000 tapes");
        assert!(
            last_digit_right < 450,
            "the last digit is the answer {last_digit_right} times in 1000"
        );
    }
}
