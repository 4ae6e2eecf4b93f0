//! Multiple-choice tasks, scored by log-likelihood. A question is a context and its choices;
//! each choice is scored as the continuation of the context ([`crate::score`]), and the model's
//! answer is the choice with the highest summed log probability (`acc`), or the highest per
//! character of the choice's text (`acc_norm`), as lm-eval's `multiple_choice` tasks count
//! them. Contexts and choices are split into tokens as lm-eval splits them: whitespace at the
//! end of the context moves to the choice, the two are encoded together, and the choice's
//! tokens are what follows the context's own encoding.
//!
//! The depths of one run share their recurrence, and a question's choices share its context:
//! every batch of questions runs its contexts once to the deepest depth, the choices read
//! them, and the coda reads the state at each depth on the way ([`score::choices`]). Under an
//! exit criterion a choice is scored as generation would produce it: the context as one
//! prompt chunk (once per question), then each of the choice's tokens alone, iterated until
//! its exit.

use std::time::Instant;

use model::Huginn;

use super::{EvalError, Line, Options, Outcome, Setting, mean_and_stderr};
use crate::adaptive::AdaptiveConfig;
use crate::exit::argmax;
use crate::score::{self, Scores};
use folder::ModelFolder;

/// One multiple-choice question, in tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub context: Vec<u32>,
    pub choices: Vec<Vec<u32>>,
    /// What `acc_norm` divides by: each choice's length in characters (in tokens for a task
    /// given as token ids).
    pub lengths: Vec<usize>,
    pub gold: usize,
}

/// A multiple-choice line as a question in tokens, checked against the model.
pub(super) fn question(line: Line, folder: &ModelFolder, options: &Options) -> Result<Question, String> {
    let question = match line {
        Line {
            context: Some(context),
            choices: Some(choices),
            context_ids: None,
            choice_ids: None,
            gold: Some(gold),
            prompt: None,
            answer: None,
            regex: None,
            prompt_ids: None,
            answer_ids: None,
        } => encode_text(folder, &context, &choices, gold, options.add_bos)?,
        Line {
            context: None,
            choices: None,
            context_ids: Some(context),
            choice_ids: Some(choices),
            gold: Some(gold),
            prompt: None,
            answer: None,
            regex: None,
            prompt_ids: None,
            answer_ids: None,
        } => Question {
            lengths: choices.iter().map(Vec::len).collect(),
            context,
            choices,
            gold,
        },
        _ => {
            return Err(
                "give `context` and `choices` (text) or `context_ids` and `choice_ids` (tokens), with `gold`".into(),
            );
        }
    };
    let config = folder.model.config();
    check(&question, config.vocab_size, config.block_size)?;
    Ok(question)
}

/// A question's tokens as lm-eval makes them (`_encode_pair`).
fn encode_text(
    folder: &ModelFolder,
    context: &str,
    choices: &[String],
    gold: usize,
    add_bos: bool,
) -> Result<Question, String> {
    let trimmed = context.trim_end();
    let spaces = &context[trimmed.len()..];
    let bos = if add_bos {
        folder.encode("").map_err(|e| e.to_string())?
    } else {
        Vec::new()
    };
    let tokens = |text: &str| {
        let ids = folder.tokenize(text).map_err(|e| e.to_string())?;
        Ok::<_, String>([bos.as_slice(), &ids].concat())
    };
    let context_ids = tokens(trimmed)?;
    let mut encoded = Vec::with_capacity(choices.len());
    for choice in choices {
        let continuation = format!("{spaces}{choice}");
        let whole = tokens(&format!("{trimmed}{continuation}"))?;
        encoded.push(whole.get(context_ids.len()..).unwrap_or_default().to_vec());
    }
    Ok(Question {
        context: context_ids,
        lengths: choices.iter().map(|c| c.chars().count()).collect(),
        choices: encoded,
        gold,
    })
}

fn check(question: &Question, vocab: usize, context: usize) -> Result<(), String> {
    if question.context.is_empty() {
        return Err("the context has no tokens".into());
    }
    if question.choices.len() < 2 {
        return Err(format!(
            "{} choice(s): a question needs at least two",
            question.choices.len()
        ));
    }
    if question.gold >= question.choices.len() {
        return Err(format!(
            "gold {} is not one of the {} choices (counted from 0)",
            question.gold,
            question.choices.len()
        ));
    }
    for (i, choice) in question.choices.iter().enumerate() {
        if choice.is_empty() {
            return Err(format!("choice {i} has no tokens after the context"));
        }
        let len = question.context.len() + choice.len();
        if len > context {
            return Err(format!(
                "choice {i} and its context are {len} tokens, more than the model's context of {context}"
            ));
        }
    }
    let ids = question.context.iter().chain(question.choices.iter().flatten());
    if let Some(id) = ids.into_iter().find(|&&id| id as usize >= vocab) {
        return Err(format!("token id {id} is outside the vocabulary of {vocab}"));
    }
    Ok(())
}

/// Scores `questions` at each of `depths` (one shared run, batches of at most `batch` rows)
/// and under each exit configuration (row by row); `progress` is told of every question done.
pub fn evaluate(
    model: &Huginn,
    name: &str,
    questions: &[Question],
    depths: &[usize],
    exits: &[AdaptiveConfig],
    batch: usize,
    mut progress: impl FnMut(),
) -> Result<Vec<Outcome>, EvalError> {
    let mut outcomes = Vec::new();
    if !depths.is_empty() {
        let started = Instant::now();
        let mut tallies = vec![Tally::default(); depths.len()];
        for chunk in chunks(questions, batch.max(1)) {
            let asked: Vec<score::choices::Question<'_>> = chunk
                .iter()
                .map(|q| score::choices::Question {
                    context: &q.context,
                    choices: &q.choices,
                })
                .collect();
            let scored = score::choices::choices_at_depths(model, &asked, depths)?;
            for ((tally, by_question), &depth) in tallies.iter_mut().zip(&scored).zip(depths) {
                for (question, choices) in chunk.iter().zip(by_question) {
                    // The context but its last token ran once; each choice row ran that token
                    // and its own, and every position ran `depth` steps.
                    let positions =
                        question.context.len() - 1 + choices.iter().map(|c| c.tokens.len() + 1).sum::<usize>();
                    tally.add(question, choices, (depth * positions) as u64);
                }
            }
            chunk.iter().for_each(|_| progress());
        }
        let seconds = started.elapsed().as_secs_f64();
        for (tally, &steps) in tallies.iter().zip(depths) {
            outcomes.push(tally.outcome(name, Setting::Depth { steps }, seconds));
        }
    }
    for config in exits {
        let started = Instant::now();
        let mut tally = Tally::default();
        for question in questions {
            let choices = score::continuations(model, &question.context, &question.choices, *config, 0)?;
            // The context ran once as one chunk at its exit's steps (`tokens[0]`'s), then each
            // choice's tokens alone, and the prediction after its last.
            let context = choices
                .first()
                .map_or(0, |c| c.tokens[0].steps * question.context.len());
            let rest: usize = choices
                .iter()
                .map(|c| c.tokens[1..].iter().map(|t| t.steps).sum::<usize>() + c.next.steps)
                .sum();
            tally.add(question, &choices, (context + rest) as u64);
            progress();
        }
        let setting = Setting::Exit {
            criterion: config.criterion.name(),
            threshold: config.threshold,
            max_steps: config.max_steps,
        };
        outcomes.push(tally.outcome(name, setting, started.elapsed().as_secs_f64()));
    }
    Ok(outcomes)
}

/// Consecutive questions whose rows (one per choice) number at most `rows`, at least one
/// question each.
fn chunks(questions: &[Question], rows: usize) -> Vec<&[Question]> {
    let mut out = Vec::new();
    let (mut start, mut count) = (0, 0);
    for (i, question) in questions.iter().enumerate() {
        if count > 0 && count + question.choices.len() > rows {
            out.push(&questions[start..i]);
            (start, count) = (i, 0);
        }
        count += question.choices.len();
    }
    if start < questions.len() {
        out.push(&questions[start..]);
    }
    out
}

/// Running counts for one setting.
#[derive(Debug, Clone, Default)]
struct Tally {
    correct: Vec<bool>,
    correct_norm: Vec<bool>,
    steps: Vec<usize>,
    core_steps: u64,
}

impl Tally {
    /// Adds a question from its choices' scores (each choice's tokens only) and the core
    /// iterations it took over every position.
    fn add(&mut self, question: &Question, choices: &[Scores], core_steps: u64) {
        let lls: Vec<f64> = choices.iter().map(|c| c.continuation(1).0).collect();
        let normed: Vec<f64> = lls
            .iter()
            .zip(&question.lengths)
            .map(|(ll, &len)| ll / len.max(1) as f64)
            .collect();
        self.correct.push(argmax(&lls) == question.gold);
        self.correct_norm.push(argmax(&normed) == question.gold);
        for choice in choices {
            self.steps.extend(choice.tokens.iter().map(|t| t.steps));
        }
        self.core_steps += core_steps;
    }

    fn outcome(&self, task: &str, setting: Setting, seconds: f64) -> Outcome {
        let (acc, acc_stderr) = mean_and_stderr(&self.correct);
        let (acc_norm, acc_norm_stderr) = mean_and_stderr(&self.correct_norm);
        Outcome {
            task: task.to_string(),
            setting,
            questions: self.correct.len(),
            acc,
            acc_stderr,
            acc_norm,
            acc_norm_stderr,
            mean_steps: self.steps.iter().sum::<usize>() as f64 / self.steps.len().max(1) as f64,
            max_steps: self.steps.iter().copied().max().unwrap_or(0),
            core_steps: self.core_steps,
            seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::Strategy;
    use crate::warm_start::WarmStart;
    use model::HuginnConfig;
    use model::burn::prelude::Device;

    fn folder() -> ModelFolder {
        ModelFolder::from_model(HuginnConfig::tiny(40, 16, 4, (1, 2, 1)).init(&Device::flex(), 9))
    }

    fn write(lines: &[&str]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), lines.join("\n")).unwrap();
        file
    }

    /// Questions whose gold is what the model itself prefers at depth 2 score 1 there, the
    /// counts match each row scored alone, and depths and exits report their steps.
    #[test]
    fn accuracy_is_counted_from_each_row_s_own_scores() {
        let folder = folder();
        let model = &folder.model;
        let mut questions = Vec::new();
        for q in 0..5u32 {
            let context: Vec<u32> = (0..2 + q).map(|t| (5 * t + q) % 40).collect();
            let choices: Vec<Vec<u32>> = (0..3u32).map(|c| vec![(c + q) % 40, (7 * c + 1) % 40]).collect();
            let lls: Vec<f64> = choices
                .iter()
                .map(|c| {
                    let row = [context.as_slice(), c].concat();
                    score::at_depths(model, &[row], &[2], 0).unwrap()[0][0]
                        .continuation(context.len())
                        .0
                })
                .collect();
            let gold = argmax(&lls);
            questions.push(Question {
                lengths: vec![2; 3],
                context,
                choices,
                gold,
            });
        }
        let exit = AdaptiveConfig {
            criterion: crate::exit::Criterion::Kl,
            threshold: 1e-3,
            ..AdaptiveConfig::fixed(6, WarmStart::Cold, Strategy::default())
        };
        let mut done = 0;
        // Batches of 4 rows: one question (3 rows) per batch.
        let outcomes = evaluate(model, "own", &questions, &[1, 2], &[exit], 4, || done += 1).unwrap();
        assert_eq!(done, 10);
        assert_eq!(outcomes.len(), 3);
        let at_two = &outcomes[1];
        assert_eq!(
            (at_two.setting, at_two.acc, at_two.acc_norm),
            (Setting::Depth { steps: 2 }, 1.0, 1.0)
        );
        assert_eq!((at_two.mean_steps, at_two.max_steps, at_two.acc_stderr), (2.0, 2, 0.0));
        // Each question: its context but the last token once, then per choice that token and
        // the choice's 2; 2 steps each.
        let positions: usize = questions.iter().map(|q| q.context.len() - 1 + 3 * 3).sum();
        assert_eq!(at_two.core_steps, 2 * positions as u64);
        let adaptive = &outcomes[2];
        assert!(adaptive.mean_steps >= 1.0 && adaptive.max_steps <= 6, "{adaptive:?}");
        // The same in one batch.
        let together = evaluate(model, "own", &questions, &[1, 2], &[], 64, || {}).unwrap();
        assert_eq!((together[1].acc, together[0].acc), (outcomes[1].acc, outcomes[0].acc));
    }

    /// Every bad line is refused with its file and line number, before any scoring.
    #[test]
    fn bad_task_files_name_the_line() {
        let folder = folder();
        let ok = r#"{"context_ids": [1, 2], "choice_ids": [[3], [4]], "gold": 1}"#;
        let too_long = format!(
            r#"{{"context_ids": {:?}, "choice_ids": [[3], [4]], "gold": 0}}"#,
            vec![1; 256]
        );
        let cases = [
            (vec![ok, "{"], ":2: not a question"),
            (
                vec![ok, r#"{"context_ids": [1], "choice_ids": [[3]], "gold": 0}"#],
                ":2: 1 choice(s)",
            ),
            (
                vec![r#"{"context_ids": [1], "choice_ids": [[3], [4]], "gold": 2}"#],
                ":1: gold 2",
            ),
            (
                vec![r#"{"context_ids": [], "choice_ids": [[3], [4]], "gold": 0}"#],
                ":1: the context has no tokens",
            ),
            (
                vec![r#"{"context_ids": [1], "choice_ids": [[3], []], "gold": 0}"#],
                ":1: choice 1 has no tokens",
            ),
            (
                vec![r#"{"context_ids": [1], "choice_ids": [[3], [40]], "gold": 0}"#],
                ":1: token id 40",
            ),
            (
                vec![r#"{"context_ids": [1], "choice_ids": [[3], [4]]}"#],
                ":1: give `context`",
            ),
            (
                vec![r#"{"context": "a", "choice_ids": [[3], [4]], "gold": 0}"#],
                ":1: give `context`",
            ),
            (
                vec![r#"{"context": "a", "choices": ["b", "c"], "gold": 0}"#],
                ":1: the model folder has no tokenizer",
            ),
            (
                vec![r#"{"context_ids": [1], "choice_ids": [[3], [4]], "gold": 0, "extra": 1}"#],
                ":1: not a question: unknown field",
            ),
            (vec![too_long.as_str()], ":1: choice 0 and its context are 257 tokens"),
            (vec!["", "  "], ": no questions"),
            (
                vec![ok, r#"{"prompt_ids": [1], "answer_ids": [2]}"#],
                ":2: a file holds one kind of question",
            ),
            (
                vec![r#"{"prompt_ids": [1], "answer_ids": []}"#],
                ":1: `answer_ids` is empty",
            ),
            (
                vec![r#"{"prompt": "a", "answer": "b", "regex": "("}"#],
                ":1: `regex` is not a regular expression",
            ),
            (vec![r#"{"prompt_ids": [1], "answer": "b"}"#], ":1: give `prompt`"),
        ];
        for (lines, expected) in cases {
            let file = write(&lines);
            let err = super::super::read_task(file.path(), &folder, &Options::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{lines:?}: {err}");
            assert!(err.starts_with(&file.path().display().to_string()), "{err}");
        }
        let file = write(&[ok, ok, ok]);
        assert_eq!(
            super::super::read_task(
                file.path(),
                &folder,
                &Options {
                    limit: Some(2),
                    ..Options::default()
                }
            )
            .unwrap()
            .questions
            .len(),
            2
        );
    }
}
