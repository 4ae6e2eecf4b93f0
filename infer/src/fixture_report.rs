//! The reference-fixture checker behind `huginn check-fixture` (and `cargo xtask check-fixture`):
//! runs every check this build knows for a fixture folder and summarises them.

use std::path::Path;

use model::burn::prelude::Device;
use model::fixture::{Check, Fixture, FixtureError};
use serde::Serialize;

/// Everything checked for one fixture folder.
#[derive(Debug, Serialize)]
pub struct FixtureReport {
    pub dir: String,
    pub forward: Vec<Check>,
    /// Truncated-backprop loss and gradients (`expected_train.safetensors`).
    pub train: Vec<Check>,
    /// Generation runs of `generate.json` this build cannot reproduce yet.
    pub generate_unsupported: Vec<String>,
}

/// The `--json` summary over all folders.
#[derive(Debug, Serialize, PartialEq)]
pub struct Summary {
    pub forward: ForwardSummary,
    pub generate: GenerateSummary,
    pub train: TrainSummary,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TrainSummary {
    pub checked: usize,
    pub failed: usize,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ForwardSummary {
    pub checked: usize,
    pub failed: usize,
    pub max_abs_err: f64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct GenerateSummary {
    pub checked: usize,
    pub failed: usize,
    pub unsupported: Vec<String>,
}

pub fn check_dir(dir: &Path, device: &Device) -> Result<FixtureReport, FixtureError> {
    let fixture = Fixture::open(dir, device)?;
    Ok(FixtureReport {
        dir: dir.display().to_string(),
        forward: fixture.check_forward()?,
        train: fixture.check_train()?,
        generate_unsupported: generation_runs(dir)?,
    })
}

/// Names of the runs in `generate.json` (none when the folder has no such file).
fn generation_runs(dir: &Path) -> Result<Vec<String>, FixtureError> {
    let path = dir.join("generate.json");
    if !path.exists() {
        return Ok(vec![]);
    }
    let format = |reason: String| FixtureError::Format {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
    let case = json["case"].as_str().unwrap_or("?");
    let runs = json["runs"]
        .as_array()
        .ok_or_else(|| format("no \"runs\" list".into()))?;
    runs.iter()
        .map(|run| {
            let name = run["name"]
                .as_str()
                .ok_or_else(|| format("a run without a \"name\"".into()))?;
            Ok(format!("{case}/{name}"))
        })
        .collect()
}

impl Summary {
    pub fn of(reports: &[FixtureReport]) -> Self {
        let forward: Vec<&Check> = reports.iter().flat_map(|r| &r.forward).collect();
        Self {
            forward: ForwardSummary {
                checked: forward.len(),
                failed: forward.iter().filter(|c| !c.passed).count(),
                max_abs_err: forward
                    .iter()
                    .map(|c| c.max_abs_err)
                    .filter(|e| e.is_finite())
                    .fold(0.0, f64::max),
            },
            train: TrainSummary {
                checked: reports.iter().map(|r| r.train.len()).sum(),
                failed: reports.iter().flat_map(|r| &r.train).filter(|c| !c.passed).count(),
            },
            generate: GenerateSummary {
                checked: 0,
                failed: 0,
                unsupported: reports.iter().flat_map(|r| r.generate_unsupported.clone()).collect(),
            },
        }
    }

    pub fn passed(&self) -> bool {
        self.forward.failed == 0 && self.train.failed == 0 && self.generate.failed == 0
    }
}
