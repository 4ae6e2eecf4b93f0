//! What a run trains on: a generated reasoning task or a text corpus, behind one interface.
//!
//! Every training batch is a pure function of the run's seed and the batch's index, so the
//! "data position" of a checkpoint is just the number of batches drawn, and a resumed run sees
//! exactly the data an uninterrupted one would.

use std::path::PathBuf;

use burn::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::addition::{self, AdditionTask};
use crate::batch::{Batch, make_batch};
use crate::chains::ChainTask;
use crate::chat_data::{ChatData, ChatDataError, ChatFormat};
use crate::hops::{HopTask, Split};
use crate::pointers::PointerTask;
use crate::text::{self, TextCorpus, TextError};

/// The data of a run, as written in its `run.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DataConfig {
    /// k-hop variable chains; train on 1..=6 hops, test on 1..=6 and 7..=10. The first
    /// `curriculum` batches ramp the most hops from 1 to the task's most trained (0: no curriculum).
    Chains {
        seed: u64,
        #[serde(default)]
        curriculum: u64,
    },
    /// k-hop pointer chains; train on 1..=6 hops, test on 1..=6 and 7..=10, with the same
    /// curriculum.
    Pointers {
        seed: u64,
        #[serde(default)]
        curriculum: u64,
    },
    /// Reversed-digit addition with operands of up to `max_digits` digits; the harder split has
    /// `max_digits + 1 ..= 2·max_digits`.
    Addition { seed: u64, max_digits: usize, padded: bool },
    /// Text files (`.jsonl`: one document per line, its `field`), or the embedded Shakespeare
    /// slice when `files` is empty, packed into rows of `seq_len` tokens.
    Text {
        files: Vec<PathBuf>,
        #[serde(default = "default_field")]
        field: String,
        tokenizer: TokenizerSource,
        seq_len: usize,
    },
    /// Chat records (JSONL) through the chat template and tokenizer of the model folder
    /// `folder` (a path or a hub name, usually the run's `init_from`); the loss is on the
    /// assistant's tokens (see `chat_data`).
    Chat {
        file: PathBuf,
        format: ChatFormat,
        folder: PathBuf,
    },
}

fn default_field() -> String {
    "text".to_string()
}

/// Where a text run's tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TokenizerSource {
    /// A byte-level BPE trained on the corpus at the start of the run.
    Train { vocab_size: usize },
    /// A Hugging Face `tokenizer.json`.
    File { path: PathBuf },
}

/// A held-out evaluation set.
pub struct EvalSplit {
    pub name: &'static str,
    pub batch: Batch,
    /// Whether exact-match accuracy means something (tasks) or only the loss does (text).
    pub exact_match: bool,
}

/// A run's data, ready to draw batches from.
pub enum Dataset {
    Chains { task: ChainTask, curriculum: u64 },
    Pointers { task: PointerTask, curriculum: u64 },
    Addition(AdditionTask),
    Text { corpus: Box<TextCorpus>, seq_len: usize },
    Chat(Box<ChatData>),
}

impl Dataset {
    /// Builds the data. A text run trains its tokenizer here unless `tokenizer` (the one saved
    /// with an earlier part of the run) is given.
    pub fn new(config: &DataConfig, tokenizer: Option<Tokenizer>) -> Result<Self, TextError> {
        Ok(match config {
            DataConfig::Chains { seed, curriculum } => Dataset::Chains {
                task: ChainTask { seed: *seed },
                curriculum: *curriculum,
            },
            DataConfig::Pointers { seed, curriculum } => Dataset::Pointers {
                task: PointerTask { seed: *seed },
                curriculum: *curriculum,
            },
            DataConfig::Addition {
                seed,
                max_digits,
                padded,
            } => Dataset::Addition(AdditionTask {
                seed: *seed,
                max_digits: *max_digits,
                padded: *padded,
            }),
            DataConfig::Text {
                files,
                field,
                tokenizer: source,
                seq_len,
            } => {
                let documents = if files.is_empty() {
                    vec![text::SHAKESPEARE.to_string()]
                } else {
                    text::read_documents(files, field)?
                };
                let tokenizer = match (tokenizer, source) {
                    (Some(t), _) => t,
                    (None, TokenizerSource::Train { vocab_size }) => text::train_bpe(&documents, *vocab_size)?,
                    (None, TokenizerSource::File { path }) => text::load_tokenizer(path)?,
                };
                Dataset::Text {
                    corpus: Box::new(TextCorpus::new(tokenizer, &documents, *seq_len)?),
                    seq_len: *seq_len,
                }
            }
            DataConfig::Chat { file, format, folder } => {
                let folder = folder::hub::resolve(folder).map_err(|e| ChatDataError::Folder(e.to_string()))?;
                Dataset::Chat(Box::new(ChatData::new(file, format, &folder, tokenizer)?))
            }
        })
    }

    /// The vocabulary a model for this data needs.
    pub fn vocab_size(&self) -> usize {
        match self {
            Dataset::Chains { .. } => ChainTask::VOCAB_SIZE,
            Dataset::Pointers { .. } => PointerTask::VOCAB_SIZE,
            Dataset::Addition(_) => addition::VOCAB_SIZE,
            Dataset::Text { corpus, .. } => corpus.tokenizer.get_vocab_size(true),
            Dataset::Chat(data) => data.tokenizer.get_vocab_size(true),
        }
    }

    /// The longest input row (the context a model needs).
    pub fn max_len(&self) -> usize {
        match self {
            Dataset::Chains { .. } => ChainTask::MAX_LEN - 1,
            Dataset::Pointers { .. } => PointerTask::MAX_LEN - 1,
            Dataset::Addition(task) => task.max_len(addition::Split::Harder) - 1,
            Dataset::Text { seq_len, .. } => *seq_len,
            Dataset::Chat(data) => data.max_len() - 1,
        }
    }

    /// The context a model needs to read any input row and generate its answer.
    pub fn context(&self) -> usize {
        match self {
            Dataset::Text { seq_len, .. } => *seq_len,
            _ => self.max_len() + 1,
        }
    }

    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        match self {
            Dataset::Text { corpus, .. } => Some(&corpus.tokenizer),
            Dataset::Chat(data) => Some(&data.tokenizer),
            _ => None,
        }
    }

    /// Training batch `index` (`rows` rows) of a run seeded `seed`.
    pub fn train_batch(&self, seed: u64, index: u64, rows: usize, device: &Device) -> Batch {
        let first = index * rows as u64;
        match self {
            Dataset::Chains { task, curriculum } => hop_batch(task, *curriculum, first, rows, device),
            Dataset::Pointers { task, curriculum } => hop_batch(task, *curriculum, first, rows, device),
            Dataset::Addition(task) => {
                let examples: Vec<_> = (first..first + rows as u64)
                    .map(|i| task.example(addition::Split::Train, i))
                    .collect();
                make_batch(&examples, addition::PAD, device)
            }
            Dataset::Text { corpus, seq_len } => text_batch(&corpus.train_rows(seed, index, rows, *seq_len), device),
            Dataset::Chat(data) => data.train_batch(seed, index, rows, device),
        }
    }

    /// The held-out sets, `rows` rows each: `test` (the training distribution, unseen
    /// examples) and `harder` (deeper or longer than anything trained) for tasks, `validation`
    /// for text.
    pub fn eval_splits(&self, rows: usize, device: &Device) -> Vec<EvalSplit> {
        let task = |name, batch| EvalSplit {
            name,
            batch,
            exact_match: true,
        };
        match self {
            Dataset::Chains { task: t, .. } => hop_splits(t, rows, device),
            Dataset::Pointers { task: t, .. } => hop_splits(t, rows, device),
            Dataset::Addition(t) => [("test", addition::Split::Test), ("harder", addition::Split::Harder)]
                .into_iter()
                .map(|(name, split)| {
                    let examples: Vec<_> = (0..rows as u64).map(|i| t.example(split, i)).collect();
                    task(name, make_batch(&examples, addition::PAD, device))
                })
                .collect(),
            Dataset::Text { corpus, seq_len } => vec![EvalSplit {
                name: "validation",
                batch: text_batch(&corpus.valid_rows(rows, *seq_len), device),
                exact_match: false,
            }],
            Dataset::Chat(data) => vec![EvalSplit {
                name: "validation",
                batch: data.valid_batch(rows, device),
                exact_match: false,
            }],
        }
    }
}

/// Training rows `first..first + rows` of a hop task, the first `curriculum` batches' worth
/// under its curriculum.
fn hop_batch<T: HopTask>(task: &T, curriculum: u64, first: u64, rows: usize, device: &Device) -> Batch {
    let ramp = curriculum * rows as u64;
    let examples: Vec<_> = (first..first + rows as u64)
        .map(|i| task.curriculum_example(i, ramp))
        .collect();
    make_batch(&examples, T::PAD, device)
}

/// The `test` and `harder` sets of a hop task.
fn hop_splits<T: HopTask>(task: &T, rows: usize, device: &Device) -> Vec<EvalSplit> {
    [("test", Split::Test), ("harder", Split::Harder)]
        .into_iter()
        .map(|(name, split)| {
            let examples: Vec<_> = (0..rows as u64).map(|i| task.example(split, i)).collect();
            EvalSplit {
                name,
                batch: make_batch(&examples, T::PAD, device),
                exact_match: true,
            }
        })
        .collect()
}

/// Next-token rows: inputs are a window's first `n` tokens, labels its last `n`.
fn text_batch(rows: &[&[u32]], device: &Device) -> Batch {
    let width = rows.first().map_or(0, |r| r.len() - 1);
    let mut inputs = Vec::with_capacity(rows.len() * width);
    let mut labels = Vec::with_capacity(rows.len() * width);
    for row in rows {
        inputs.extend(row[..width].iter().map(|t| *t as i64));
        labels.extend(row[1..].iter().map(|t| *t as i64));
    }
    let shape = [rows.len(), width];
    Batch {
        inputs: Tensor::from_data(TensorData::new(inputs, shape), device),
        labels: Tensor::from_data(TensorData::new(labels, shape), device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_pure_functions_of_their_index() {
        let device = Device::flex();
        let data = Dataset::new(&DataConfig::Chains { seed: 4, curriculum: 0 }, None).unwrap();
        let ids = |b: &Batch| b.inputs.to_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        let a = data.train_batch(1, 5, 4, &device);
        assert_eq!(ids(&a), ids(&data.train_batch(1, 5, 4, &device)));
        assert_ne!(ids(&a), ids(&data.train_batch(1, 6, 4, &device)));
        assert_eq!(a.inputs.dims(), [4, data.max_len()]);
        let splits = data.eval_splits(8, &device);
        assert_eq!(splits.iter().map(|s| s.name).collect::<Vec<_>>(), ["test", "harder"]);

        // Pointer chains: one scored answer per row, the last position's label.
        let data = Dataset::new(&DataConfig::Pointers { seed: 4, curriculum: 3 }, None).unwrap();
        assert_eq!(data.vocab_size(), PointerTask::VOCAB_SIZE);
        let b = data.train_batch(1, 0, 4, &device);
        assert_eq!(b.inputs.dims(), [4, crate::pointers::LEN - 1]);
        let labels = b.labels.to_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        let scored: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != -100).collect();
        let width = crate::pointers::LEN - 1;
        assert_eq!(scored, (1..=4).map(|r| r * width - 1).collect::<Vec<_>>());
        assert!(labels.iter().all(|&l| l == -100 || (0..10).contains(&l)));
        assert_eq!(data.eval_splits(8, &device)[1].batch.inputs.dims(), [8, width]);

        let text = DataConfig::Text {
            files: vec![],
            field: default_field(),
            tokenizer: TokenizerSource::Train { vocab_size: 300 },
            seq_len: 16,
        };
        let data = Dataset::new(&text, None).unwrap();
        assert_eq!(data.vocab_size(), 300);
        let b = data.train_batch(1, 0, 2, &device);
        let (inputs, labels) = (
            ids(&b),
            b.labels.to_data().convert::<i64>().try_to_vec::<i64>().unwrap(),
        );
        assert_eq!(inputs[1..16], labels[..15], "labels are the inputs shifted by one");
        assert_eq!(data.eval_splits(3, &device)[0].batch.inputs.dims(), [3, 16]);
    }
}
