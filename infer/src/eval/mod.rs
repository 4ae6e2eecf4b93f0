//! Evaluation by depth: tasks from local files scored at fixed recurrence depths and under
//! exit criteria, as the paper's accuracy-against-compute tables are made. Two kinds of task:
//! multiple choice, scored by log-likelihood as lm-eval's `acc` and `acc_norm` ([`choice`]),
//! and generation, scored by exact match of a greedy answer ([`generate`]).

pub mod choice;
pub mod generate;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::adaptive::AdaptiveConfig;
use crate::score::ScoreError;
use choice::Question;
use folder::ModelFolder;
use generate::Prompted;

#[derive(Debug, Error)]
pub enum EvalError {
    #[error("cannot read {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}:{line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
    #[error("{0}: no questions")]
    Empty(PathBuf),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    Input(#[from] model::InputError),
}

/// How a task's text becomes tokens, and how a generation task's answers are made.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// The first questions of each file only.
    pub limit: Option<usize>,
    /// The folder's beginning-of-sequence token before each context or prompt (text tasks;
    /// lm-eval adds none by default).
    pub add_bos: bool,
    /// Generation prompts go through the folder's chat template as a user message, after this
    /// system message when given.
    pub chat: bool,
    pub system: Option<String>,
    /// Most new tokens of a generated answer.
    pub max_new: usize,
    /// Text that ends a generated answer (left out of it).
    pub stop: Vec<String>,
}

/// A task file's questions.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub name: String,
    pub questions: Questions,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Questions {
    Choice(Vec<Question>),
    Generate(Vec<Prompted>),
}

impl Questions {
    pub fn len(&self) -> usize {
        match self {
            Self::Choice(q) => q.len(),
            Self::Generate(q) => q.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A line of a task file. Multiple choice: `context`, `choices` (text) or `context_ids`,
/// `choice_ids` (tokens), and `gold`. Generation: `prompt`, `answer` and optionally `regex`
/// (text) or `prompt_ids`, `answer_ids` (tokens).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    context: Option<String>,
    choices: Option<Vec<String>>,
    context_ids: Option<Vec<u32>>,
    choice_ids: Option<Vec<Vec<u32>>>,
    gold: Option<usize>,
    prompt: Option<String>,
    answer: Option<String>,
    regex: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    answer_ids: Option<Vec<u32>>,
}

/// Reads a JSONL task file, one question per line, every line checked against `folder`'s model
/// before any is scored. A file holds one kind of question.
pub fn read_task(path: &Path, folder: &ModelFolder, options: &Options) -> Result<Task, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|error| EvalError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let (mut choices, mut prompts) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        if options
            .limit
            .is_some_and(|limit| choices.len() + prompts.len() == limit)
        {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| EvalError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let line: Line = serde_json::from_str(line).map_err(|e| bad(format!("not a question: {e}")))?;
        let multiple_choice = line.gold.is_some() || line.choices.is_some() || line.choice_ids.is_some();
        if multiple_choice {
            choices.push(choice::question(line, folder, options).map_err(bad)?);
        } else {
            prompts.push(generate::question(line, folder, options).map_err(bad)?);
        }
        if !choices.is_empty() && !prompts.is_empty() {
            return Err(bad(
                "a file holds one kind of question: multiple choice or generation".into()
            ));
        }
    }
    let questions = if prompts.is_empty() {
        Questions::Choice(choices)
    } else {
        Questions::Generate(prompts)
    };
    if questions.is_empty() {
        return Err(EvalError::Empty(path.to_path_buf()));
    }
    let name = path
        .file_stem()
        .map_or_else(|| "task".into(), |s| s.to_string_lossy().into_owned());
    Ok(Task { name, questions })
}

/// Scores `task` at each of `depths` and under each exit configuration, batches of at most
/// `batch` rows; `progress` is told of every question done at every setting run apart.
pub fn evaluate(
    folder: &ModelFolder,
    task: &Task,
    depths: &[usize],
    exits: &[AdaptiveConfig],
    batch: usize,
    options: &Options,
    progress: impl FnMut(),
) -> Result<Vec<Outcome>, EvalError> {
    let name = &task.name;
    match &task.questions {
        Questions::Choice(questions) => {
            choice::evaluate(&folder.model, name, questions, depths, exits, batch, progress)
        }
        Questions::Generate(prompts) => {
            generate::evaluate(folder, name, prompts, depths, exits, batch, options, progress)
        }
    }
}

/// How the recurrence runs for one line of the results.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Setting {
    /// Every token gets this many steps.
    Depth { steps: usize },
    /// Every token runs until the criterion says it may exit, at most `max_steps`.
    Exit {
        criterion: &'static str,
        threshold: f64,
        max_steps: usize,
    },
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Depth { steps } => write!(f, "r={steps}"),
            Self::Exit {
                criterion,
                threshold,
                max_steps,
            } => write!(f, "{criterion}:{threshold:e} (≤{max_steps})"),
        }
    }
}

/// A task's result at one setting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub task: String,
    pub setting: Setting,
    pub questions: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    /// `acc` per character of the choice (multiple choice only; `acc` again for generation).
    pub acc_norm: f64,
    pub acc_norm_stderr: f64,
    /// Recurrence steps per scored token (the choices' tokens), mean and most.
    pub mean_steps: f64,
    pub max_steps: usize,
    /// Core iterations run over all positions of all rows: the compute the setting took (the
    /// depths of one run share theirs, so each reports its own count as if run alone).
    pub core_steps: u64,
    /// Seconds of the run this setting belongs to (shared by the depths of one run).
    pub seconds: f64,
}

/// The share of `true` and its standard error, from the sample standard deviation (as
/// lm-eval reports it; 0 for a single question).
fn mean_and_stderr(hits: &[bool]) -> (f64, f64) {
    let n = hits.len() as f64;
    let p = hits.iter().filter(|&&h| h).count() as f64 / n.max(1.0);
    let stderr = if hits.len() > 1 {
        (p * (1.0 - p) / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (p, stderr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_is_lm_eval_s() {
        let (p, se) = mean_and_stderr(&[true, false, true, true]);
        assert_eq!(p, 0.75);
        assert!((se - (0.75f64 * 0.25 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_and_stderr(&[true]), (1.0, 0.0));
    }
}
