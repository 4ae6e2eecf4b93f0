//! Log-likelihood scoring: how likely the model finds given tokens, at fixed recurrence depths
//! or under an exit criterion. Multiple-choice evaluation (lm-eval's `loglikelihood`) and the
//! server's `echo` with `logprobs` ask this: for every token after the first, its log
//! probability given the tokens before it, whether it is the model's greedy choice, the most
//! likely alternatives, and the recurrence steps its prediction took.
//!
//! Fixed depths run as generation's prompt pass does (from a zero state, no cache), batched:
//! rows of different lengths are padded on the right, which changes nothing before a row's end
//! under causal attention. The depths of one call share one recurrence: the state after 8
//! steps is on the way to 16, so the coda reads it at each depth asked for. Under an exit
//! criterion each token is fed alone and iterated until it exits (the reference's
//! `forward_with_adaptive_compute`), one row at a time. Multiple choice shares each context
//! among its choices: at fixed depths through [`choices`], under an exit through
//! [`continuations`].

pub mod choices;

use model::burn::prelude::*;
use model::{Huginn, InitialState, InputError, NoCache};
use thiserror::Error;

use crate::adaptive::{self, AdaptiveConfig, MAX_STEPS};
use crate::exit::argmax;
use crate::limits::{OutOfMemory, check_machine_memory};
use crate::range::{OutOfRange, within};

/// Most alternatives listed per token (OpenAI's legacy completions allow 5, its chat 20).
pub const MAX_TOP: usize = 20;

#[derive(Debug, Error)]
pub enum ScoreError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Range(#[from] OutOfRange),
    #[error(transparent)]
    Memory(#[from] OutOfMemory),
}

/// How one token scored.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScore {
    pub token: u32,
    /// `log p(token | tokens before it)`.
    pub logprob: f32,
    /// The token is the model's most likely one there (the first maximum, as greedy decoding
    /// picks).
    pub greedy: bool,
    /// The `top` most likely tokens with their log probabilities, best first (ties by id).
    pub top: Vec<(u32, f32)>,
    /// Recurrence steps the prediction of this token took.
    pub steps: usize,
}

/// A row's scores: `tokens[i]` is token `i + 1` of the row (the first has no context), and
/// what the model predicts after the row's last token.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub tokens: Vec<TokenScore>,
    pub next: Prediction,
}

/// The model's prediction for the token after a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub logits: Vec<f32>,
    pub steps: usize,
}

impl Prediction {
    /// How `token` scores as the next one, with the `top` most likely listed.
    pub fn score(&self, token: u32, top: usize) -> TokenScore {
        token_score(&self.logits, token, top, self.steps)
    }
}

impl Scores {
    /// The continuation that starts at token `from` (≥ 1) of the row: its summed log
    /// probability and whether every one of its tokens is greedy.
    pub fn continuation(&self, from: usize) -> (f64, bool) {
        let scored = &self.tokens[from.max(1) - 1..];
        let sum = scored.iter().map(|t| f64::from(t.logprob)).sum();
        (sum, scored.iter().all(|t| t.greedy))
    }
}

/// Scores every row at each of `depths` (each in `1..=MAX_STEPS`): `[depth][row]`, in the
/// order of `depths`. Rows may differ in length; a row of one token scores nothing but has
/// its next prediction.
pub fn at_depths(
    model: &Huginn,
    rows: &[Vec<u32>],
    depths: &[usize],
    top: usize,
) -> Result<Vec<Vec<Scores>>, ScoreError> {
    within("top_logprobs", top, 0, MAX_TOP)?;
    for &depth in depths {
        within("depth", depth, 1, MAX_STEPS)?;
    }
    let Some(&deepest) = depths.iter().max() else {
        return Ok(Vec::new());
    };
    if rows.is_empty() {
        return Ok(vec![Vec::new(); depths.len()]);
    }
    if rows.iter().any(Vec::is_empty) {
        return Err(InputError::Empty.into());
    }
    let len = rows.iter().map(Vec::len).max().expect("rows");
    let config = model.config();
    check_machine_memory(
        "the logits of this scoring pass",
        logits_bytes(rows.len(), len, config.vocab_size),
    )?;
    let tokens = model.tokens(&padded_right(rows.iter().map(Vec::as_slice), len))?;
    let rotary = model.rotary(0, len);
    let e = model.embed_prelude(tokens, &rotary, &mut NoCache);
    let s0 = model.initial_state(&e, &InitialState::Zeros);
    let mut out: Vec<Option<Vec<Scores>>> = vec![None; depths.len()];
    model.recur(&e, s0, 0..deepest, &rotary, &mut NoCache, |i, state| {
        let depth = i + 1;
        if !depths.contains(&depth) {
            return;
        }
        let logits = model.coda_head(state.clone(), &rotary, &mut NoCache);
        let logits = host_logits(logits);
        let scores: Vec<Scores> = rows
            .iter()
            .enumerate()
            .map(|(b, row)| padded_row_scores(&logits, config.vocab_size, (b, len), row, depth, top))
            .collect();
        for (slot, &d) in out.iter_mut().zip(depths) {
            if d == depth {
                *slot = Some(scores.clone());
            }
        }
    });
    Ok(out.into_iter().map(|s| s.expect("every depth reached")).collect())
}

/// Rows of non-empty tokens padded on the right to `width`, each with its own last token: any
/// valid id does, since nothing before a row's end reads what follows it.
fn padded_right<'a>(rows: impl Iterator<Item = &'a [u32]>, width: usize) -> Vec<Vec<u32>> {
    rows.map(|row| {
        let mut padded = row.to_vec();
        padded.resize(width, *row.last().expect("a token"));
        padded
    })
    .collect()
}

/// The scores of `row`, row `r` of a right-padded pass at `depth` whose host logits are
/// `[rows, width, vocab]`: each token after the first from the position before it, and the
/// prediction after its last.
fn padded_row_scores(
    logits: &[f32],
    vocab: usize,
    (r, width): (usize, usize),
    row: &[u32],
    depth: usize,
    top: usize,
) -> Scores {
    let at = |position: usize| {
        let from = (r * width + position) * vocab;
        &logits[from..from + vocab]
    };
    Scores {
        tokens: (1..row.len())
            .map(|p| token_score(at(p - 1), row[p], top, depth))
            .collect(),
        next: Prediction {
            logits: at(row.len() - 1).to_vec(),
            steps: depth,
        },
    }
}

/// Scores `row` token by token under `config`'s exit criterion: each token's prediction takes
/// the steps its own exit took.
pub fn adaptive(model: &Huginn, row: &[u32], config: AdaptiveConfig, top: usize) -> Result<Scores, ScoreError> {
    within("top_logprobs", top, 0, MAX_TOP)?;
    check_machine_memory(
        "the logits of this scoring pass",
        logits_bytes(1, row.len(), model.config().vocab_size),
    )?;
    let mut predictions = adaptive::forward_token_by_token(model, row, config)?;
    let (steps, logits) = predictions.pop().ok_or(InputError::Empty)?;
    Ok(Scores {
        tokens: predictions
            .iter()
            .zip(&row[1..])
            .map(|((steps, logits), &token)| token_score(logits, token, top, *steps))
            .collect(),
        next: Prediction { logits, steps },
    })
}

/// Scores each of `continuations` after `context` as generation would produce it under
/// `config`: the context runs as one prompt chunk (once, shared by all), and each continuation
/// token's prediction takes the steps its own exit took. Only the continuations are scored
/// (`tokens[i]` is `continuation[i]`); `tokens[0].steps` are the context chunk's.
pub fn continuations(
    model: &Huginn,
    context: &[u32],
    continuations: &[Vec<u32>],
    config: AdaptiveConfig,
    top: usize,
) -> Result<Vec<Scores>, ScoreError> {
    within("top_logprobs", top, 0, MAX_TOP)?;
    if context.is_empty() {
        return Err(InputError::Empty.into());
    }
    let longest = continuations.iter().map(Vec::len).max().unwrap_or(0);
    check_machine_memory(
        "the logits of this scoring pass",
        logits_bytes(continuations.len(), longest + 1, model.config().vocab_size),
    )?;
    let predictions = adaptive::forward_after_prompt(model, context, continuations, config)?;
    Ok(predictions
        .into_iter()
        .zip(continuations)
        .map(|(mut predictions, continuation)| {
            let (steps, logits) = predictions.pop().expect("the prompt's prediction at least");
            Scores {
                tokens: predictions
                    .iter()
                    .zip(continuation)
                    .map(|((steps, logits), &token)| token_score(logits, token, top, *steps))
                    .collect(),
                next: Prediction { logits, steps },
            }
        })
        .collect())
}

/// Bytes of `[batch, len, vocab]` f32 logits, on the device and copied to the host.
fn logits_bytes(batch: usize, len: usize, vocab: usize) -> Option<usize> {
    batch.checked_mul(len)?.checked_mul(vocab)?.checked_mul(2 * 4)
}

fn host_logits(logits: Tensor<3>) -> Vec<f32> {
    logits
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 logits")
}

/// How `token` scores among one position's `logits` (a prediction that took `steps`), with
/// the `top` most likely listed: the log-softmax in f64. Generation reports the tokens it draws
/// with it.
pub fn token_score(logits: &[f32], token: u32, top: usize, steps: usize) -> TokenScore {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - f64::from(max)).exp()).sum();
    let log_norm = f64::from(max) + sum.ln();
    let logprob = |l: f32| (f64::from(l) - log_norm) as f32;
    let mut best: Vec<u32> = (0..logits.len() as u32).collect();
    if top > 0 {
        let top = top.min(best.len());
        let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        best.select_nth_unstable_by(top - 1, order);
        best.truncate(top);
        best.sort_by(order);
    } else {
        best.clear();
    }
    TokenScore {
        token,
        logprob: logprob(logits[token as usize]),
        greedy: argmax(logits) == token as usize,
        top: best.into_iter().map(|id| (id, logprob(logits[id as usize]))).collect(),
        steps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::Strategy;
    use crate::warm_start::WarmStart;
    use model::HuginnConfig;
    use model::burn::tensor::activation::log_softmax;

    fn tiny() -> Huginn {
        HuginnConfig::tiny(50, 16, 4, (1, 2, 1)).init(&Device::flex(), 3)
    }

    /// Rows of different lengths scored together at several depths equal each row alone
    /// through the plain forward pass at that depth, and the token-by-token computation (a
    /// cache, one token per pass) at that depth.
    #[test]
    fn batched_depths_equal_each_row_alone_and_token_by_token() {
        let model = tiny();
        let rows = vec![vec![3, 14, 15, 9, 2, 6], vec![5, 3], vec![7, 7, 1, 4]];
        let depths = [4, 1, 8];
        let scored = at_depths(&model, &rows, &depths, 3).unwrap();
        for (d, &depth) in depths.iter().enumerate() {
            for (b, row) in rows.iter().enumerate() {
                let forward = model.forward(model.tokens(std::slice::from_ref(row)).unwrap(), depth);
                let logprobs = host_logits(log_softmax(forward.logits, 2));
                let config = AdaptiveConfig::fixed(depth, WarmStart::Cold, Strategy::default());
                let stepwise = adaptive(&model, row, config, 3).unwrap();
                let vocab = 50;
                for (p, got) in scored[d][b].tokens.iter().enumerate() {
                    let alone = logprobs[p * vocab + row[p + 1] as usize];
                    assert!(
                        (got.logprob - alone).abs() < 1e-4,
                        "depth {depth} row {b} token {p}: {got:?} vs {alone}"
                    );
                    let step = &stepwise.tokens[p];
                    assert!((got.logprob - step.logprob).abs() < 1e-4, "{got:?} vs {step:?}");
                    assert_eq!((got.steps, step.steps), (depth, depth));
                    assert_eq!(got.token, row[p + 1]);
                    assert_eq!(got.top.len(), 3);
                    assert!(got.top.windows(2).all(|w| w[0].1 >= w[1].1), "{:?}", got.top);
                    assert_eq!(got.greedy, got.top[0].0 == got.token);
                    assert_eq!(
                        got.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                        step.top.iter().map(|t| t.0).collect::<Vec<_>>()
                    );
                }
                let last = row.len() - 1;
                let next = scored[d][b].next.score(0, 50);
                let alone = logprobs[last * vocab];
                assert!((next.logprob - alone).abs() < 1e-4, "{next:?} vs {alone}");
                assert_eq!(stepwise.next.steps, depth);
            }
        }
    }

    /// At a fixed depth the context as one chunk and the continuation token by token give what
    /// the one padded pass gives for the continuation's tokens.
    #[test]
    fn a_continuation_after_its_context_equals_the_whole_pass_at_a_fixed_depth() {
        let model = tiny();
        let (context, rest) = (vec![3, 9, 27, 31], vec![12, 5, 40]);
        let whole = at_depths(&model, &[[context.clone(), rest.clone()].concat()], &[5], 2).unwrap();
        let config = AdaptiveConfig::fixed(5, WarmStart::Cold, Strategy::default());
        let after = continuations(&model, &context, &[rest.clone(), vec![7]], config, 2).unwrap();
        let alone = continuations(&model, &context, &[vec![7]], config, 2).unwrap();
        assert_eq!(after[1], alone[0], "a continuation is scored as it is alone");
        let after = &after[0];
        assert_eq!(after.tokens.len(), rest.len());
        for (got, want) in after.tokens.iter().zip(&whole[0][0].tokens[context.len() - 1..]) {
            assert_eq!(
                (got.token, got.steps, got.greedy),
                (want.token, want.steps, want.greedy)
            );
            assert!((got.logprob - want.logprob).abs() < 1e-4, "{got:?} vs {want:?}");
        }
    }

    /// The context runs once for all continuations; each still scores exactly as it does alone,
    /// under an exit criterion whose steps differ token by token, with a warm start carried
    /// from the context into the continuation.
    #[test]
    fn continuations_of_one_context_each_score_exactly_as_alone_under_an_exit() {
        let model = tiny();
        let context = vec![3, 9, 27, 31, 4];
        let rests = vec![vec![12, 5, 40], vec![7], vec![1, 2, 44, 6]];
        let config = AdaptiveConfig {
            criterion: crate::exit::Criterion::LatentDiff,
            threshold: 0.2,
            ..AdaptiveConfig::fixed(24, WarmStart::Normalized, Strategy::default())
        };
        let together = continuations(&model, &context, &rests, config, 3).unwrap();
        let mut steps = Vec::new();
        for (rest, got) in rests.iter().zip(&together) {
            let alone = continuations(&model, &context, std::slice::from_ref(rest), config, 3).unwrap();
            assert_eq!(*got, alone[0]);
            steps.extend(got.tokens.iter().map(|t| t.steps));
        }
        assert!(
            steps.iter().any(|s| *s != steps[0]),
            "exits at different steps: {steps:?}"
        );
        assert!(continuations(&model, &context, &[], config, 3).unwrap().is_empty());
    }

    #[test]
    fn a_continuation_sums_its_tokens_and_is_greedy_when_each_is() {
        let model = tiny();
        let row = vec![1, 2, 3, 4];
        let scores = at_depths(&model, std::slice::from_ref(&row), &[2], 20)
            .unwrap()
            .remove(0)
            .remove(0);
        let (sum, greedy) = scores.continuation(2);
        let expected: f64 = scores.tokens[1..].iter().map(|t| f64::from(t.logprob)).sum();
        assert!((sum - expected).abs() < 1e-9);
        assert_eq!(greedy, scores.tokens[1..].iter().all(|t| t.greedy));
        // The whole vocabulary's probabilities sum to one.
        let total: f64 = scores.next.score(0, 50).top.iter().map(|t| f64::from(t.1).exp()).sum();
        assert!((total - 1.0).abs() < 1e-4, "{total}");
        // The greedy continuation (each next token the argmax) is greedy.
        let mut greedy_row = vec![1];
        for _ in 0..3 {
            let s = at_depths(&model, &[[greedy_row.clone(), vec![0]].concat()], &[2], 1).unwrap();
            greedy_row.push(s[0][0].tokens.last().unwrap().top[0].0);
        }
        let s = at_depths(&model, &[greedy_row], &[2], 0).unwrap();
        assert!(s[0][0].continuation(1).1);
        assert!(s[0][0].tokens.iter().all(|t| t.top.is_empty()));
    }

    #[test]
    fn bad_input_is_refused() {
        let model = tiny();
        let err = |r: Result<_, ScoreError>| r.map(|_: Vec<Vec<Scores>>| ()).unwrap_err().to_string();
        assert!(err(at_depths(&model, &[vec![]], &[1], 0)).contains("empty"));
        let one = at_depths(&model, &[vec![1]], &[1], 0).unwrap();
        assert!(one[0][0].tokens.is_empty());
        assert_eq!(one[0][0].next.logits.len(), 50);
        assert!(err(at_depths(&model, &[vec![1, 2]], &[0], 0)).contains("depth"));
        assert!(err(at_depths(&model, &[vec![1, 2]], &[MAX_STEPS + 1], 0)).contains("depth"));
        assert!(err(at_depths(&model, &[vec![1, 2]], &[1], MAX_TOP + 1)).contains("top_logprobs"));
        assert!(err(at_depths(&model, &[vec![1, 99]], &[1], 0)).contains("99"));
        assert!(at_depths(&model, &[vec![1, 2]], &[], 0).unwrap().is_empty());
    }
}
