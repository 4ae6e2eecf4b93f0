//! The crate's one error type: what can go wrong reading inputs (models, prompts, captures,
//! bases, metrics) or writing outputs (files, images), each naming the file involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// (`error`, not `source`: the message already says it, so error chains need not repeat it.)
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// A file that exists but does not hold what it should.
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(transparent)]
    Metrics(#[from] train::metrics::MetricsError),
    #[error(transparent)]
    Input(#[from] model::InputError),
    #[error(transparent)]
    Weights(#[from] model::WeightsError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Arguments that cannot work together (e.g. more components than the data has rows).
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: drawing failed: {reason}")]
    Plot { path: PathBuf, reason: String },
}

impl AnalysisError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |error| AnalysisError::Io { path, error }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        AnalysisError::Format {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
