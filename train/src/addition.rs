//! Reversed-digit addition, generated on the fly (`../shared/spec/experiments.md`, task B).
//!
//! `472 + 95` is written least-significant digit first, `274+59=765` (or, padded to width 3,
//! `274+590=7650`: operands to the width, the answer to one more digit), so each answer digit
//! follows the digits and the carry it depends on. The
//! carry chain is the difficulty knob for depth. Example `i` of a split is a pure function of
//! `(seed, split, i)` through an in-house splitmix64, so it is identical across runs, machines
//! and crate versions, and needs no storage.

use crate::rng::SplitMix64;

/// Token ids: digits 0-9 are themselves.
pub const PLUS: u32 = 10;
pub const EQUALS: u32 = 11;
pub const NEWLINE: u32 = 12;
pub const PAD: u32 = 13;
pub const VOCAB_SIZE: usize = 14;

/// Which examples: training and its held-out test pairs share operand lengths `1..=N`;
/// `Harder` has operands of `N+1..=2N` digits (length generalisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
    Harder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdditionTask {
    pub seed: u64,
    /// `N`: the most digits of a training operand.
    pub max_digits: usize,
    /// Pad operands and answer with trailing zeros (in reversed form) to a fixed width.
    pub padded: bool,
}

/// One example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Operands and sum, least-significant digit first, unpadded.
    pub a: Vec<u8>,
    pub b: Vec<u8>,
    pub sum: Vec<u8>,
    /// The whole line as token ids, ending with the newline.
    pub tokens: Vec<u32>,
    /// Index in `tokens` of the first answer token (right after `=`).
    pub answer_start: usize,
    /// Longest run of consecutive carries: the difficulty for depth.
    pub carry_chain: usize,
}

impl Example {
    /// Next-token training pair: inputs `tokens[..-1]`, labels `tokens[1..]` with every label
    /// outside the answer (digits and newline after `=`) set to `-100`.
    pub fn inputs_and_labels(&self) -> (Vec<u32>, Vec<i64>) {
        let inputs = self.tokens[..self.tokens.len() - 1].to_vec();
        let labels = (1..self.tokens.len())
            .map(|i| {
                if i >= self.answer_start {
                    self.tokens[i] as i64
                } else {
                    -100
                }
            })
            .collect();
        (inputs, labels)
    }
}

impl AdditionTask {
    /// Operand length range of a split.
    pub fn digits(&self, split: Split) -> (usize, usize) {
        match split {
            Split::Train | Split::Test => (1, self.max_digits),
            Split::Harder => (self.max_digits + 1, 2 * self.max_digits),
        }
    }

    /// The longest line of a split (for padding batches): two operands, `+`, `=`, the answer
    /// (one digit longer) and the newline.
    pub fn max_len(&self, split: Split) -> usize {
        let n = self.digits(split).1;
        2 * n + 1 + 1 + (n + 1) + 1
    }

    /// Example `index` of `split`.
    pub fn example(&self, split: Split, index: u64) -> Example {
        let split_tag = match split {
            Split::Train => 0x7472_6169_6e00_0001,
            Split::Test => 0x7465_7374_0000_0002,
            Split::Harder => 0x6861_7264_0000_0003,
        };
        let mut rng = SplitMix64(self.seed ^ split_tag ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let (lo, hi) = self.digits(split);
        loop {
            let a = rng.operand(lo, hi);
            let b = rng.operand(lo, hi);
            // One pair in a hundred is test-only, by its unordered value.
            let held_out = pair_hash(&a, &b).is_multiple_of(100);
            let wanted = match split {
                Split::Train => !held_out,
                Split::Test => held_out,
                Split::Harder => true,
            };
            if wanted {
                return self.render(a, b, hi);
            }
        }
    }

    fn render(&self, a: Vec<u8>, b: Vec<u8>, width: usize) -> Example {
        let (sum, carry_chain) = add(&a, &b);
        let (wa, wb, ws) = if self.padded {
            (width, width, width + 1)
        } else {
            (a.len(), b.len(), sum.len())
        };
        let mut tokens: Vec<u32> = padded_digits(&a, wa);
        tokens.push(PLUS);
        tokens.extend(padded_digits(&b, wb));
        tokens.push(EQUALS);
        let answer_start = tokens.len();
        tokens.extend(padded_digits(&sum, ws));
        tokens.push(NEWLINE);
        Example {
            a,
            b,
            sum,
            tokens,
            answer_start,
            carry_chain,
        }
    }
}

/// `digits` as token ids, extended with zeros to `width`.
fn padded_digits(digits: &[u8], width: usize) -> Vec<u32> {
    (0..width).map(|i| digits.get(i).copied().unwrap_or(0) as u32).collect()
}

/// Digit-wise sum (least-significant first, no trailing zeros beyond the first digit) and the
/// longest run of consecutive carries.
fn add(a: &[u8], b: &[u8]) -> (Vec<u8>, usize) {
    let mut sum = Vec::with_capacity(a.len().max(b.len()) + 1);
    let (mut carry, mut run, mut longest) = (0u8, 0, 0);
    for i in 0..a.len().max(b.len()) {
        let s = a.get(i).unwrap_or(&0) + b.get(i).unwrap_or(&0) + carry;
        sum.push(s % 10);
        carry = s / 10;
        run = if carry == 1 { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    if carry == 1 {
        sum.push(1);
    }
    (sum, longest)
}

/// FNV-1a over the two operands in a canonical order (stable forever, unlike std's hasher).
fn pair_hash(a: &[u8], b: &[u8]) -> u64 {
    let key = |d: &[u8]| (d.len(), d.iter().rev().copied().collect::<Vec<u8>>());
    let (first, second) = if key(a) <= key(b) { (a, b) } else { (b, a) };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in first.iter().chain([&255u8]).chain(second.iter()) {
        h ^= *byte as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(tokens: &[u32]) -> String {
        tokens
            .iter()
            .map(|&t| match t {
                0..=9 => char::from(b'0' + t as u8),
                PLUS => '+',
                EQUALS => '=',
                NEWLINE => '\n',
                _ => '_',
            })
            .collect()
    }

    fn value(digits: &[u8]) -> u128 {
        digits.iter().rev().fold(0, |v, d| v * 10 + *d as u128)
    }

    #[test]
    fn renders_the_specs_example() {
        let digits = |n: u64| n.to_string().bytes().rev().map(|b| b - b'0').collect::<Vec<u8>>();
        let padded = AdditionTask {
            seed: 0,
            max_digits: 3,
            padded: true,
        };
        let e = padded.render(digits(472), digits(95), 3);
        assert_eq!(text(&e.tokens), "274+590=7650\n");
        assert_eq!(e.answer_start, 8);
        let plain = AdditionTask {
            padded: false,
            ..padded
        };
        assert_eq!(text(&plain.render(digits(472), digits(95), 3).tokens), "274+59=765\n");
        let (inputs, labels) = e.inputs_and_labels();
        assert_eq!(inputs.len(), labels.len());
        assert_eq!(
            labels.iter().filter(|l| **l >= 0).count(),
            5,
            "4 answer digits and the newline"
        );
        assert_eq!(add(&digits(999), &digits(1)).1, 3);
    }

    #[test]
    fn examples_are_deterministic_correct_and_split() {
        let task = AdditionTask {
            seed: 42,
            max_digits: 4,
            padded: false,
        };
        assert_eq!(task.example(Split::Train, 7), task.example(Split::Train, 7));
        assert_ne!(task.example(Split::Train, 7), task.example(Split::Train, 8));
        let mut lengths = [0usize; 5];
        let mut train_pairs = std::collections::HashSet::new();
        for i in 0..4000 {
            let e = task.example(Split::Train, i);
            assert_eq!(value(&e.sum), value(&e.a) + value(&e.b));
            assert!(e.tokens.len() <= task.max_len(Split::Train));
            lengths[e.a.len()] += 1;
            train_pairs.insert((value(&e.a).min(value(&e.b)), value(&e.a).max(value(&e.b))));
        }
        // Lengths uniform over 1..=4, not skewed to the longest.
        assert!(lengths[1..].iter().all(|c| (800..1200).contains(c)), "{lengths:?}");
        for i in 0..300 {
            let e = task.example(Split::Test, i);
            let pair = (value(&e.a).min(value(&e.b)), value(&e.a).max(value(&e.b)));
            assert!(!train_pairs.contains(&pair), "test pair {pair:?} seen in training");
        }
        for i in 0..300 {
            let e = task.example(Split::Harder, i);
            assert!((5..=8).contains(&e.a.len()) && (5..=8).contains(&e.b.len()));
            assert_eq!(value(&e.sum), value(&e.a) + value(&e.b));
        }
    }
}
