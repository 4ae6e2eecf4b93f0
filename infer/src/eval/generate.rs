//! Generation tasks, scored by exact match: each prompt's greedy answer (up to a stop string,
//! a stop token or `max_new` tokens) against the expected one, as lm-eval's `generate_until`
//! tasks with `exact_match`. A `regex` picks the answer out of the generated text first (its
//! first capture group, or the whole match), as lm-eval's regex filter does; answers compare
//! with surrounding whitespace removed. Token-id tasks match when the answer's tokens begin
//! the generated ones.
//!
//! Each depth decodes the prompts as left-padded batches (every row computes what it would
//! alone); under an exit criterion the prompt runs at full depth and each new token exits on
//! its own (the reference's `generate_with_adaptive_compute`), one prompt at a time.

use std::time::Instant;

use regex::Regex;

use super::{EvalError, Line, Options, Outcome, Setting, mean_and_stderr};
use crate::adaptive::{self, AdaptiveConfig, AdaptiveGeneration, Decoding};
use crate::sampling::SamplingConfig;
use crate::stop::StopStrings;
use folder::ModelFolder;
use folder::chat::{Message, Role};

/// One generation question, in tokens.
#[derive(Debug, Clone)]
pub struct Prompted {
    pub prompt: Vec<u32>,
    pub answer: Answer,
}

/// What a generated answer must be.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Text, after `regex` picks it out of the generation when given.
    Text { answer: String, regex: Option<Regex> },
    /// The first tokens of the generation.
    Ids(Vec<u32>),
}

impl PartialEq for Prompted {
    fn eq(&self, other: &Self) -> bool {
        self.prompt == other.prompt
            && match (&self.answer, &other.answer) {
                (Answer::Text { answer: a, regex: r }, Answer::Text { answer: b, regex: s }) => {
                    a == b && r.as_ref().map(Regex::as_str) == s.as_ref().map(Regex::as_str)
                }
                (Answer::Ids(a), Answer::Ids(b)) => a == b,
                _ => false,
            }
    }
}

/// A generation line as a question in tokens, checked against the model.
pub(super) fn question(line: Line, folder: &ModelFolder, options: &Options) -> Result<Prompted, String> {
    let config = folder.model.config();
    let prompted = match line {
        Line {
            prompt: Some(prompt),
            answer: Some(answer),
            regex,
            prompt_ids: None,
            answer_ids: None,
            ..
        } => {
            let regex = regex
                .map(|pattern| Regex::new(&pattern).map_err(|e| format!("`regex` is not a regular expression: {e}")))
                .transpose()?;
            Prompted {
                prompt: encode(folder, &prompt, options)?,
                answer: Answer::Text { answer, regex },
            }
        }
        Line {
            prompt: None,
            answer: None,
            regex: None,
            prompt_ids: Some(prompt),
            answer_ids: Some(answer),
            ..
        } => {
            if answer.is_empty() {
                return Err("`answer_ids` is empty".into());
            }
            Prompted {
                prompt,
                answer: Answer::Ids(answer),
            }
        }
        _ => {
            return Err(
                "give `prompt` and `answer` (text, optionally `regex`) or `prompt_ids` and `answer_ids` (tokens); \
                 multiple choice takes `context`, `choices` and `gold`"
                    .into(),
            );
        }
    };
    if prompted.prompt.is_empty() {
        return Err("the prompt has no tokens".into());
    }
    let ids = prompted.prompt.iter().chain(match &prompted.answer {
        Answer::Ids(ids) => ids.as_slice(),
        Answer::Text { .. } => &[],
    });
    if let Some(id) = ids.into_iter().find(|&&id| id as usize >= config.vocab_size) {
        return Err(format!(
            "token id {id} is outside the vocabulary of {}",
            config.vocab_size
        ));
    }
    let len = prompted.prompt.len() + options.max_new;
    if len > config.block_size {
        return Err(format!(
            "the prompt's {} tokens and {} new ones exceed the model's context of {}",
            prompted.prompt.len(),
            options.max_new,
            config.block_size
        ));
    }
    Ok(prompted)
}

/// The prompt's tokens: through the chat template when asked, else the text alone.
fn encode(folder: &ModelFolder, prompt: &str, options: &Options) -> Result<Vec<u32>, String> {
    if options.chat {
        let mut messages = Vec::new();
        if let Some(system) = &options.system {
            messages.push(Message::new(Role::System, system.clone()));
        }
        messages.push(Message::new(Role::User, prompt));
        return folder.encode_chat(&messages).map_err(|e| e.to_string());
    }
    let ids = if options.add_bos {
        folder.encode(prompt)
    } else {
        folder.tokenize(prompt)
    };
    ids.map_err(|e| e.to_string())
}

/// Generates an answer for every prompt at each of `depths` and under each exit, and counts
/// the exact matches.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    folder: &ModelFolder,
    name: &str,
    prompts: &[Prompted],
    depths: &[usize],
    exits: &[AdaptiveConfig],
    batch: usize,
    options: &Options,
    mut progress: impl FnMut(),
) -> Result<Vec<Outcome>, EvalError> {
    let model = &folder.model;
    let decoding = Decoding {
        sampling: SamplingConfig::default(),
        stop_tokens: folder.stop_tokens.clone(),
    };
    let mut outcomes = Vec::new();
    let fixed = depths.iter().map(|&steps| {
        (
            Setting::Depth { steps },
            AdaptiveConfig::fixed(steps, Default::default(), Default::default()),
        )
    });
    let adaptive = exits.iter().map(|config| {
        let setting = Setting::Exit {
            criterion: config.criterion.name(),
            threshold: config.threshold,
            max_steps: config.max_steps,
        };
        (setting, *config)
    });
    for (setting, config) in fixed.chain(adaptive) {
        let started = Instant::now();
        // Batched rows of an exit criterion would iterate each token until the last row exits.
        let rows = if matches!(setting, Setting::Depth { .. }) {
            batch.max(1)
        } else {
            1
        };
        let (mut hits, mut steps) = (Vec::new(), Vec::new());
        let mut core_steps = 0u64;
        for chunk in prompts.chunks(rows) {
            let inputs: Vec<Vec<u32>> = chunk.iter().map(|p| p.prompt.clone()).collect();
            let generated = adaptive::generate_batch_with(model, &inputs, options.max_new, config, &decoding)?;
            for (prompted, generation) in chunk.iter().zip(&generated) {
                hits.push(matches(folder, prompted, generation, &options.stop));
                steps.extend(&generation.steps_per_token);
                // The prompt at full depth, then each new token's own steps.
                core_steps += (prompted.prompt.len() * config.max_steps) as u64
                    + generation.steps_per_token.iter().map(|&s| s as u64).sum::<u64>();
                progress();
            }
        }
        let (acc, acc_stderr) = mean_and_stderr(&hits);
        outcomes.push(Outcome {
            task: name.to_string(),
            setting,
            questions: hits.len(),
            acc,
            acc_stderr,
            acc_norm: acc,
            acc_norm_stderr: acc_stderr,
            mean_steps: steps.iter().sum::<usize>() as f64 / steps.len().max(1) as f64,
            max_steps: steps.iter().copied().max().unwrap_or(0),
            core_steps,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(outcomes)
}

/// Whether `generation` answers `prompted`.
fn matches(folder: &ModelFolder, prompted: &Prompted, generation: &AdaptiveGeneration, stop: &[String]) -> bool {
    let tokens = match generation.tokens.iter().position(|t| folder.stop_tokens.contains(t)) {
        Some(end) => &generation.tokens[..end],
        None => &generation.tokens[..],
    };
    match &prompted.answer {
        Answer::Ids(answer) => tokens.starts_with(answer),
        Answer::Text { answer, regex } => {
            let Some(tokenizer) = &folder.tokenizer else {
                return false;
            };
            let text = tokenizer.decode(tokens, true).unwrap_or_default();
            let mut stops = StopStrings::new(stop.iter().cloned());
            let released = stops.push(&text);
            let text = if released.stopped {
                released.text
            } else {
                released.text + &stops.finish()
            };
            let picked = match regex {
                None => Some(text.as_str()),
                Some(regex) => regex
                    .captures(&text)
                    .and_then(|c| c.get(1).or_else(|| c.get(0)))
                    .map(|m| m.as_str()),
            };
            picked.is_some_and(|picked| picked.trim() == answer.trim())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::HuginnConfig;
    use model::burn::prelude::Device;

    /// Prompts whose answer is what the model itself generates at depth 2 all match there,
    /// and an answer that is not generated does not.
    #[test]
    fn exact_match_counts_the_model_s_own_answers() {
        let folder = ModelFolder::from_model(HuginnConfig::tiny(40, 16, 4, (1, 2, 1)).init(&Device::flex(), 4));
        let model = &folder.model;
        let options = Options {
            max_new: 3,
            ..Options::default()
        };
        let prompts: Vec<Prompted> = (0..4u32)
            .map(|p| {
                let prompt: Vec<u32> = (0..3 + p).map(|t| (3 * t + p) % 40).collect();
                let config = AdaptiveConfig::fixed(2, Default::default(), Default::default());
                let own = adaptive::generate_batch(model, std::slice::from_ref(&prompt), 3, config).unwrap();
                let mut answer = own[0].tokens[..2].to_vec();
                if p == 3 {
                    answer[0] = (answer[0] + 1) % 40;
                }
                Prompted {
                    prompt,
                    answer: Answer::Ids(answer),
                }
            })
            .collect();
        let mut done = 0;
        let outcomes = evaluate(&folder, "own", &prompts, &[2], &[], 3, &options, || done += 1).unwrap();
        assert_eq!(done, 4);
        assert_eq!((outcomes[0].acc, outcomes[0].questions), (0.75, 4));
        assert_eq!((outcomes[0].mean_steps, outcomes[0].max_steps), (2.0, 2));
    }
}
