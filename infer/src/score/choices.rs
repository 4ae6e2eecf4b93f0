//! Multiple-choice questions at fixed depths, each context run once. The choices of a question
//! share its context, so the context's keys and values at every unrolled layer (each prelude
//! layer, each core iteration's layers, and the coda's at each depth asked for, since the coda
//! reads a different state at each) are computed once, in one pass over the batch's contexts.
//! Every choice row then runs only its own tokens and reads its question's entries. The
//! context's last token goes with the choices (its prediction is the first choice token's), so
//! the contexts' pass needs no logits at all.
//!
//! This is the whole `context + choice` row's pass ([`super::at_depths`]) with the shared part
//! done once: equal up to float rounding (the products run at other shapes), tested within
//! 1e-4 per log probability.

use std::collections::HashMap;

use model::burn::prelude::*;
use model::{Attend, Huginn, InitialState, InputError, KvCache, LayerSlot};

use super::{ScoreError, Scores, host_logits, logits_bytes, padded_right, padded_row_scores};
use crate::adaptive::MAX_STEPS;
use crate::cache::{float_bytes, row_index};
use crate::limits::check_machine_memory;
use crate::range::within;

/// A context and the choices that may follow it, in tokens.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    pub context: &'a [u32],
    pub choices: &'a [Vec<u32>],
}

/// Scores every choice of every question at each of `depths` (each in `1..=MAX_STEPS`):
/// `[depth][question][choice]`, in the order of `depths`. A choice's [`Scores`] has
/// `tokens[i]` for `choice[i]` and `next` after its last token. Contexts and choices must not
/// be empty, and a context with any of its choices must fit the model's context.
pub fn choices_at_depths(
    model: &Huginn,
    questions: &[Question<'_>],
    depths: &[usize],
) -> Result<Vec<Vec<Vec<Scores>>>, ScoreError> {
    for &depth in depths {
        within("depth", depth, 1, MAX_STEPS)?;
    }
    let Some(&deepest) = depths.iter().max() else {
        return Ok(Vec::new());
    };
    let config = model.config();
    for q in questions {
        if q.context.is_empty() || q.choices.iter().any(Vec::is_empty) {
            return Err(InputError::Empty.into());
        }
        if let Some(choice) = q.choices.iter().find(|c| q.context.len() + c.len() > config.block_size) {
            let (len, context) = (q.context.len() + choice.len(), config.block_size);
            return Err(InputError::TooLong { len, context }.into());
        }
    }
    // A row per choice: its question, and the context's last token followed by the choice.
    let rows: Vec<(usize, Vec<u32>)> = questions
        .iter()
        .enumerate()
        .flat_map(|(q, question)| {
            let last = *question.context.last().expect("checked: not empty");
            question.choices.iter().map(move |c| (q, [&[last][..], c].concat()))
        })
        .collect();
    if rows.is_empty() {
        return Ok(vec![vec![Vec::new(); questions.len()]; depths.len()]);
    }
    let width = rows.iter().map(|(_, r)| r.len()).max().expect("rows");
    // The longest context part kept in the cache (all of a context but its last token).
    let known = questions.iter().map(|q| q.context.len() - 1).max().unwrap_or(0);
    let device = model.device();
    check_machine_memory(
        "the logits of this scoring pass",
        logits_bytes(rows.len(), width, config.vocab_size),
    )?;
    let layers = config.n_layers_in_prelude
        + deepest * config.n_layers_in_recurrent_block
        + depths.len() * config.n_layers_in_coda;
    let entries = [questions.len(), known, layers, 2, config.n_embd, float_bytes(&device)]
        .iter()
        .try_fold(1usize, |acc, n| acc.checked_mul(*n));
    check_machine_memory("the contexts' keys and values", entries)?;

    let mut cache = ContextCache::default();
    if known > 0 {
        // Contexts right-padded (nothing before a context's end reads its padding).
        let contexts: Vec<Vec<u32>> = questions
            .iter()
            .map(|q| {
                let mut context = q.context[..q.context.len() - 1].to_vec();
                context.resize(known, q.context[0]);
                context
            })
            .collect();
        let rotary = model.rotary(0, known);
        let e = model.embed_prelude(model.tokens(&contexts)?, &rotary, &mut cache);
        let s0 = model.initial_state(&e, &InitialState::Zeros);
        let states = states_at(model, &e, s0, depths, deepest, &rotary, &mut cache);
        for (depth, state) in states {
            cache.depth = depth;
            model.coda(state, &rotary, &mut cache);
        }
        cache.read_by(
            &rows.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            &rows
                .iter()
                .map(|(q, _)| questions[*q].context.len() - 1)
                .collect::<Vec<_>>(),
            known,
            width,
            &device,
        );
    }

    // Each row's positions follow its own context.
    let positions: Vec<i64> = rows
        .iter()
        .flat_map(|(q, _)| {
            let start = questions[*q].context.len() - 1;
            (start..start + width).map(|p| p as i64)
        })
        .collect();
    let rotary = model.rotary_at(Tensor::from_data(
        TensorData::new(positions, [rows.len(), width]),
        &device,
    ));
    let padded = padded_right(rows.iter().map(|(_, row)| row.as_slice()), width);
    let e = model.embed_prelude(model.tokens(&padded)?, &rotary, &mut cache);
    let s0 = model.initial_state(&e, &InitialState::Zeros);
    let states = states_at(model, &e, s0, depths, deepest, &rotary, &mut cache);
    let vocab = config.vocab_size;
    let mut scored: HashMap<usize, Vec<Vec<Scores>>> = HashMap::new();
    for (depth, state) in states {
        cache.depth = depth;
        let logits = host_logits(model.coda_head(state, &rotary, &mut cache));
        let mut by_question: Vec<Vec<Scores>> = vec![Vec::new(); questions.len()];
        for (r, (q, row)) in rows.iter().enumerate() {
            by_question[*q].push(padded_row_scores(&logits, vocab, (r, width), row, depth, 0));
        }
        scored.insert(depth, by_question);
    }
    Ok(depths.iter().map(|d| scored[d].clone()).collect())
}

/// Runs the recurrence from `s0` to `deepest` and returns the state at each depth of `depths`,
/// shallowest first.
fn states_at(
    model: &Huginn,
    e: &Tensor<3>,
    s0: Tensor<3>,
    depths: &[usize],
    deepest: usize,
    rotary: &model::Rotary,
    cache: &mut ContextCache,
) -> Vec<(usize, Tensor<3>)> {
    let mut states = Vec::new();
    model.recur(e, s0, 0..deepest, rotary, cache, |i, state| {
        if depths.contains(&(i + 1)) {
            states.push((i + 1, state.clone()));
        }
    });
    states
}

/// The contexts' keys and values per unrolled layer: recorded by the contexts' pass, then read
/// by the choices' pass, where each row attends to its question's context before its own
/// tokens.
#[derive(Default)]
struct ContextCache {
    /// The depth whose coda runs now (its keys differ by depth; other slots are stored at 0).
    depth: usize,
    /// `[questions, H, known, d]` keys and values per (slot, depth).
    entries: HashMap<(LayerSlot, usize), (Tensor<4>, Tensor<4>)>,
    /// Set once the contexts are in: each choice row's question, and which columns each of its
    /// queries sees.
    reading: Option<(Tensor<1, Int>, Tensor<4, Bool>)>,
}

impl ContextCache {
    /// Switches to reading: row `r` belongs to question `question[r]`, whose context fills the
    /// first `context[r]` of `known` columns; then come the row's own `width` columns, seen
    /// causally.
    fn read_by(&mut self, question: &[usize], context: &[usize], known: usize, width: usize, device: &Device) {
        let columns = known + width;
        let hidden: Vec<bool> = context
            .iter()
            .flat_map(|&context| {
                (0..width)
                    .flat_map(move |s| (0..columns).map(move |t| if t < known { t >= context } else { t - known > s }))
            })
            .collect();
        let mask = Tensor::from_data(TensorData::new(hidden, [question.len(), 1, width, columns]), device);
        self.reading = Some((row_index(question, device), mask));
    }
}

impl KvCache for ContextCache {
    fn update(&mut self, slot: LayerSlot, keys: Tensor<4>, values: Tensor<4>) -> Attend {
        let depth = if matches!(slot, LayerSlot::Coda(_)) {
            self.depth
        } else {
            0
        };
        match &self.reading {
            None => {
                self.entries.insert((slot, depth), (keys.clone(), values.clone()));
                Attend {
                    keys,
                    values,
                    mask: None,
                }
            }
            Some((rows, mask)) => {
                let (context_keys, context_values) = &self.entries[&(slot, depth)];
                let joined = |context: &Tensor<4>, own: Tensor<4>| {
                    Tensor::cat(vec![context.clone().select(0, rows.clone()), own], 2)
                };
                Attend {
                    keys: joined(context_keys, keys),
                    values: joined(context_values, values),
                    mask: Some(mask.clone()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::at_depths;
    use model::HuginnConfig;

    fn tiny() -> Huginn {
        HuginnConfig::tiny(50, 16, 4, (1, 2, 1)).init(&Device::flex(), 3)
    }

    /// Contexts of different lengths (one of a single token), choices of different lengths and
    /// numbers, depths out of order: every choice scores as its whole row does in one pass.
    #[test]
    fn each_choice_scores_as_its_whole_row() {
        let model = tiny();
        let contexts = [vec![3, 14, 15, 9, 2, 6], vec![5], vec![7, 7, 1]];
        let choices = [
            vec![vec![8], vec![1, 2, 3], vec![44, 4]],
            vec![vec![9, 9], vec![10]],
            vec![vec![3, 4, 5, 6]],
        ];
        let questions: Vec<Question<'_>> = contexts
            .iter()
            .zip(&choices)
            .map(|(context, choices)| Question { context, choices })
            .collect();
        let depths = [4, 1, 9];
        let shared = choices_at_depths(&model, &questions, &depths).unwrap();
        let rows: Vec<Vec<u32>> = questions
            .iter()
            .flat_map(|q| q.choices.iter().map(|c| [q.context, c].concat()))
            .collect();
        let whole = at_depths(&model, &rows, &depths, 0).unwrap();
        for d in 0..depths.len() {
            let mut whole_rows = whole[d].iter();
            for (q, question) in questions.iter().enumerate() {
                assert_eq!(shared[d][q].len(), question.choices.len());
                for (c, choice) in question.choices.iter().enumerate() {
                    let want = whole_rows.next().unwrap();
                    let got = &shared[d][q][c];
                    let from = question.context.len() - 1;
                    assert_eq!(got.tokens.len(), choice.len());
                    for (g, w) in got.tokens.iter().zip(&want.tokens[from..]) {
                        assert_eq!((g.token, g.steps), (w.token, depths[d]));
                        assert!((g.logprob - w.logprob).abs() < 1e-4, "{g:?} vs {w:?}");
                    }
                    let (g, w) = (got.next.score(0, 0), want.next.score(0, 0));
                    assert!((g.logprob - w.logprob).abs() < 1e-4, "{g:?} vs {w:?}");
                }
            }
        }
    }

    #[test]
    fn bad_questions_are_refused() {
        let model = tiny();
        let ok = [vec![1]];
        let err = |context: &[u32], choices: &[Vec<u32>], depths: &[usize]| {
            choices_at_depths(&model, &[Question { context, choices }], depths)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[], &ok, &[1]).contains("empty"));
        assert!(err(&[1], &[vec![]], &[1]).contains("empty"));
        assert!(err(&[1], &ok, &[0]).contains("depth"));
        assert!(err(&[1, 99], &ok, &[1]).contains("99"));
        let long = vec![1; model.config().block_size];
        assert!(err(&long, &ok, &[1]).contains("exceeds the context length"));
        assert!(choices_at_depths(&model, &[], &[1]).unwrap()[0].is_empty());
        assert!(
            choices_at_depths(
                &model,
                &[Question {
                    context: &[1],
                    choices: &ok
                }],
                &[]
            )
            .unwrap()
            .is_empty()
        );
    }
}
