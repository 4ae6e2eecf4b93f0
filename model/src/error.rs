//! Typed errors of the model crate. Each message names the file and the key it is about, so a
//! binary can print it as one line and exit.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}", io_message(path, error))]
    Io { path: PathBuf, error: std::io::Error },
    #[error("invalid config JSON: {0}")]
    Parse(String),
    #[error("invalid config: {0} is missing (the weights' shapes depend on it)")]
    Missing(&'static str),
    #[error("invalid config: {field}: {reason}")]
    Field { field: String, reason: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("{path}: {inner}")]
    InFile { path: PathBuf, inner: Box<ConfigError> },
}

impl ConfigError {
    pub(crate) fn in_file(self, path: &Path) -> Self {
        match self {
            Self::Io { .. } | Self::InFile { .. } => self,
            other => Self::InFile {
                path: path.to_path_buf(),
                inner: Box::new(other),
            },
        }
    }
}

/// An I/O failure as one line: a file that is not there is "missing", other failures keep the
/// OS's words. The `io::Error` is deliberately not the error's `source`, which `{:#}` would print
/// a second time.
fn io_message(path: &Path, error: &std::io::Error) -> String {
    if error.kind() == std::io::ErrorKind::NotFound {
        format!("{} is missing", path.display())
    } else {
        format!("cannot read {}: {error}", path.display())
    }
}

/// Errors while reading or writing weights.
#[derive(Debug, Error)]
pub enum WeightsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}", io_message(path, error))]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: not a valid safetensors file (truncated or corrupt?): {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: invalid shard index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("{path}: missing tensor {key:?}")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: unexpected tensor {key:?} (not part of this model)")]
    UnexpectedKey { path: PathBuf, key: String },
    #[error("{path}: tensor {key:?} has shape {found:?}, the config implies {expected:?} ({dims})")]
    Shape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        /// The config fields `expected` comes from, so the message names the one that is wrong.
        dims: &'static str,
        found: Vec<usize>,
    },
    #[error("{path}: tensor {key:?} has unsupported dtype {dtype} (f32, f16, bf16, f64 are read)")]
    Dtype { path: PathBuf, key: String, dtype: String },
    #[error("{path}: quantized tensor {key:?} is corrupt: {reason}")]
    Quantized { path: PathBuf, key: String, reason: String },
    #[error("{path}: {reason}")]
    Requantize { path: PathBuf, reason: String },
    #[error("{path}: tensor {key:?} contains non-finite values")]
    NonFinite { path: PathBuf, key: String },
    #[error(
        "{path}: lm_head.weight differs from transformer.wte.weight (max |diff| {max_diff:e}); the model ties them"
    )]
    UntiedHead { path: PathBuf, max_diff: f32 },
    #[error("{path}: no weights found (expected model.safetensors or model.safetensors.index.json)")]
    NoWeights { path: PathBuf },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("{path}: burn record does not fit this model: {reason}")]
    Record { path: PathBuf, reason: String },
}

/// Token input the model cannot take.
#[derive(Debug, Error, PartialEq)]
pub enum InputError {
    #[error("empty input: no tokens")]
    Empty,
    #[error("rows of different lengths ({first} and {other}) need padding")]
    Ragged { first: usize, other: usize },
    #[error("input of {len} tokens exceeds the context length of {context}")]
    TooLong { len: usize, context: usize },
    #[error(
        "a prompt of {prompt} tokens and {new} new ones need {} positions, more than the context length of {context}",
        .prompt + .new
    )]
    NoRoom { prompt: usize, new: usize, context: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
}
