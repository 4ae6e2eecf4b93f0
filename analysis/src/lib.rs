//! # analysis: the latent dynamics of recurrent-depth models
//!
//! What the paper's §7 looks at, for any model this workspace loads:
//!
//! * [`capture`]: run a prompt for `R` recurrence steps through the model's own loop and keep
//!   every position's normalised state `ln_f(s_i)` at every iteration, with the coda's read-out
//!   of each ([`outputs`]: entropy, KL to the previous iteration, top-1 token);
//! * [`pca`]: randomized PCA of all those states on the device, a basis several runs can share;
//! * [`dynamics`]: each token's trajectory labelled fixed point, orbit or slider;
//! * [`exits`]: steps-to-exit per token under the adaptive-compute exit criteria;
//! * [`curves`]: training and depth curves from a run's metrics;
//! * [`eval_report`]: a `huginn eval` report, for its accuracy-against-depth and
//!   accuracy-against-compute plots;
//! * [`plot`]: the figures, PNG and SVG;
//! * [`quantization`]: how far 8- and 4-bit weights move the predictions at each depth;
//! * [`ranges`]: how far a pass's activations go, against f16's range;
//! * [`report`]: all of it for one training run, with an HTML gallery and a JSON summary.
//!
//! The `huginn-analysis` binary puts each step on the command line:
//!
//! ```text
//! huginn-analysis capture --model RUN/final --ids 1,2,3 --steps 64 --reference-steps 256 --out cap
//! huginn-analysis pca cap other-cap --components 6 --out basis.safetensors
//! huginn-analysis plot-trajectories cap --basis basis.safetensors --out traj
//! huginn-analysis heatmap cap --out heat
//! huginn-analysis training-curves RUN --out curves
//! huginn-analysis eval-plots eval/report.json --out eval/accuracy
//! huginn-analysis report RUN                          # RUN/report/index.html
//! ```

pub mod capture;
pub mod curves;
pub mod dynamics;
pub mod error;
pub mod eval_report;
pub mod exits;
pub mod linalg;
pub mod outputs;
pub mod pca;
pub mod plot;
pub mod prompt;
pub mod quantization;
pub mod ranges;
pub mod report;
pub mod store;

use std::path::{Path, PathBuf};

use model::burn::prelude::*;

pub use capture::{Capture, CaptureOptions, Init};
pub use error::AnalysisError;
pub use pca::{Pca, PcaOptions};
pub use prompt::Prompt;

/// `base` with `suffix` appended (`run/traj` + `.png`), whatever dots `base` holds.
pub fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A device tensor's values on the host, as f32 whatever the float type.
pub(crate) fn host_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32")
}

/// An integer tensor's values on the host (token ids: non-negative, below 2³²).
pub(crate) fn host_u32<const D: usize>(t: Tensor<D, Int>) -> Vec<u32> {
    t.into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("converted to i64")
        .into_iter()
        .map(|v| v as u32)
        .collect()
}
