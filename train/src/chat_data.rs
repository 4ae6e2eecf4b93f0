//! Chat data for fine-tuning: JSONL records, each a conversation (`messages`) or a
//! question/answer pair, rendered by the model's own chat template (`infer`'s, as inference
//! renders it) and tokenized with its tokenizer. The loss counts the assistant's tokens only:
//! those inside the template's `{% generation %}` tags (`transformers`' assistant mask), so the
//! headers, the prompt and the padding carry no loss.
//!
//! Every tenth record is held out for validation when there are at least ten; otherwise the
//! validation loss is measured on the training records. Training batch `i` draws its rows
//! from `(seed, i)` alone, so a resumed run sees the data an uninterrupted one would.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use folder::TextFiles;
use folder::chat::{Message, Role};
use model::HuginnConfig;
use model::pretrained::CONFIG_FILE;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::batch::{Batch, TaskExample, make_batch};
use crate::rng::SplitMix64;

/// The fields of a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ChatFormat {
    /// `{FIELD: [{"role": "system" | "user" | "assistant", "content": …}, …]}`.
    Messages { field: String },
    /// `{QUESTION: …, ANSWER: …}`: one user turn and the assistant's reply.
    Pair { question: String, answer: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ChatDataError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}:{line}: {reason}")]
    Record { path: PathBuf, line: usize, reason: String },
    #[error("{0}: no records")]
    Empty(PathBuf),
    #[error("the model folder {dir} has no {what}, which chat data needs")]
    Missing { dir: PathBuf, what: &'static str },
    #[error("{0}")]
    Folder(String),
}

/// One tokenized record and which of its tokens are the assistant's.
struct Row {
    tokens: Vec<u32>,
    assistant: Vec<bool>,
}

/// The tokenized records of a chat file.
pub struct ChatData {
    pub tokenizer: Tokenizer,
    rows: Vec<Row>,
    train: Vec<usize>,
    valid: Vec<usize>,
    pad: u32,
}

impl ChatData {
    /// Reads `file` through the chat template of the model folder `folder`, tokenized with
    /// `tokenizer` when given (the one a run saved), else the folder's.
    pub fn new(
        file: &Path,
        format: &ChatFormat,
        folder: &Path,
        tokenizer: Option<Tokenizer>,
    ) -> Result<Self, ChatDataError> {
        let config =
            HuginnConfig::from_file(folder.join(CONFIG_FILE)).map_err(|e| ChatDataError::Folder(e.to_string()))?;
        let text = TextFiles::open(folder, config.vocab_size).map_err(|e| ChatDataError::Folder(e.to_string()))?;
        let missing = |what| ChatDataError::Missing {
            dir: folder.to_path_buf(),
            what,
        };
        let template = text.chat_template.ok_or(missing(
            "chat template (chat_template in tokenizer_config.json, or chat_template.jinja)",
        ))?;
        let tokenizer = match tokenizer {
            Some(t) => t,
            None => text.tokenizer.ok_or(missing("tokenizer.json"))?,
        };
        let pad = text
            .special_tokens
            .pad
            .as_deref()
            .and_then(|p| tokenizer.token_to_id(p))
            .unwrap_or(0);
        let source = std::fs::read_to_string(file).map_err(|e| ChatDataError::Io {
            path: file.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut rows = Vec::new();
        for (i, line) in source.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = |reason: String| ChatDataError::Record {
                path: file.to_path_buf(),
                line: i + 1,
                reason,
            };
            let messages = parse_record(line, format).map_err(bad)?;
            let (text, spans) = template
                .render_with_assistant_spans(&messages)
                .map_err(|e| bad(e.to_string()))?;
            let encoding = tokenizer.encode(text.as_str(), false).map_err(|e| bad(e.to_string()))?;
            let assistant: Vec<bool> = encoding
                .get_offsets()
                .iter()
                .map(|&(a, b)| a < b && spans.iter().any(|s| s.start <= a && b <= s.end))
                .collect();
            if encoding.len() > config.block_size {
                return Err(bad(format!(
                    "{} tokens, beyond the model's context of {} (block_size); shorten or remove this record",
                    encoding.len(),
                    config.block_size
                )));
            }
            // The first token is never a label (nothing predicts it).
            if !assistant.iter().skip(1).any(|&a| a) {
                return Err(bad(
                    "the chat template marks no assistant text in this record (it needs {% generation %} tags \
                     and an assistant message)"
                        .into(),
                ));
            }
            rows.push(Row {
                tokens: encoding.get_ids().to_vec(),
                assistant,
            });
        }
        if rows.is_empty() {
            return Err(ChatDataError::Empty(file.to_path_buf()));
        }
        let all: Vec<usize> = (0..rows.len()).collect();
        let (train, valid) = if rows.len() >= 10 {
            all.iter().partition(|&&i| i % 10 != 9)
        } else {
            (all.clone(), all)
        };
        Ok(Self {
            tokenizer,
            rows,
            train,
            valid,
            pad,
        })
    }

    /// The longest record: the context a model needs.
    pub fn max_len(&self) -> usize {
        self.rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0)
    }

    /// Training batch `index` of `rows` records, drawn from `(seed, index)`.
    pub fn train_batch(&self, seed: u64, index: u64, rows: usize, device: &Device) -> Batch {
        let mut rng = SplitMix64(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let picked: Vec<&Row> = (0..rows)
            .map(|_| &self.rows[self.train[rng.below(self.train.len() as u64) as usize]])
            .collect();
        make_batch(&picked, self.pad, device)
    }

    /// Up to `rows` validation records.
    pub fn valid_batch(&self, rows: usize, device: &Device) -> Batch {
        let picked: Vec<&Row> = self.valid.iter().take(rows).map(|&i| &self.rows[i]).collect();
        make_batch(&picked, self.pad, device)
    }
}

impl TaskExample for &Row {
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    fn is_answer(&self, i: usize) -> bool {
        self.assistant[i]
    }
}

/// A record's messages.
fn parse_record(line: &str, format: &ChatFormat) -> Result<Vec<Message>, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let text = |field: &str| {
        value
            .get(field)
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("no string field `{field}`"))
    };
    match format {
        ChatFormat::Pair { question, answer } => Ok(vec![
            Message::new(Role::User, text(question)?),
            Message::new(Role::Assistant, text(answer)?),
        ]),
        ChatFormat::Messages { field } => {
            let list = value
                .get(field)
                .and_then(|v| v.as_array())
                .ok_or_else(|| format!("no list field `{field}`"))?;
            list.iter()
                .enumerate()
                .map(|(i, m)| {
                    let role = match m.get("role").and_then(|r| r.as_str()) {
                        Some("system") => Role::System,
                        Some("user") => Role::User,
                        Some("assistant") => Role::Assistant,
                        other => {
                            return Err(format!(
                                "{field}[{i}]: role must be system, user or assistant, not {other:?}"
                            ));
                        }
                    };
                    let content = m
                        .get("content")
                        .and_then(|c| c.as_str())
                        .ok_or_else(|| format!("{field}[{i}]: no string `content`"))?;
                    Ok(Message::new(role, content))
                })
                .collect()
        }
    }
}
