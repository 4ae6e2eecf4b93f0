//! Experiments as files: a [`RunConfig`] written as TOML (`huginn-train --config run.toml`), the
//! same structure as a run's `run.json`. Every run directory keeps its configuration in this form
//! as `run.toml`, so a run is repeated or varied by pointing `--config` at it.
//!
//! Reading is strict where serde alone is lenient: a key the configuration does not have (a typo,
//! a field of another variant) is an error rather than silently ignored, because a misspelt
//! hyper-parameter would otherwise train with its default.

use std::path::{Path, PathBuf};

use crate::run::RunConfig;

/// A configuration file that cannot be read: its path and why, on one line.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigFileError {
    pub path: PathBuf,
    pub reason: String,
}

impl RunConfig {
    /// Reads a TOML configuration file.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigFileError> {
        let error = |reason: String| ConfigFileError {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Self::from_toml(&text).map_err(error)
    }

    /// Parses the text of a TOML configuration; the error names the line or the unknown key.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let located = |e: toml::de::Error| {
            let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
            match e.span() {
                Some(span) => {
                    let line = text[..span.start].matches('\n').count() + 1;
                    match key_at(text, span.start) {
                        Some(key) if !message.contains(&format!("`{key}`")) => {
                            format!("line {line}: {message} (in `{key}`)")
                        }
                        _ => format!("line {line}: {message}"),
                    }
                }
                None => message,
            }
        };
        let config: Self = toml::from_str(text).map_err(located)?;
        let given: toml::Table = text.parse().map_err(located)?;
        let known = toml::Table::try_from(&config).map_err(|e| e.to_string())?;
        match unknown_key(&given, &known, "") {
            Some(key) => Err(format!("unknown key `{key}`")),
            None => Ok(config),
        }
    }

    /// The configuration as TOML, every field written out, checked to read back (TOML integers
    /// are signed 64-bit, so a seed of 2^63 or more is written but not read).
    pub fn to_toml(&self) -> Result<String, String> {
        let text = toml::to_string(self).map_err(|e| format!("the configuration has no TOML form: {e}"))?;
        Self::from_toml(&text).map_err(|e| format!("the configuration does not read back from TOML: {e}"))?;
        Ok(text)
    }
}

/// The dotted key whose `key = value` line holds byte `offset` of `text`, under the nearest
/// `[table]` header above it: what an error about a value there is about.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(['[', ']']).trim());
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_string(),
    })
}

/// The first key of `given` that `known` (the parsed configuration written back) lacks: a key
/// serde accepted only by ignoring it.
fn unknown_key(given: &toml::Table, known: &toml::Table, prefix: &str) -> Option<String> {
    given.iter().find_map(|(key, value)| {
        let path = format!("{prefix}{key}");
        match (value, known.get(key)) {
            (_, None) => Some(path),
            (toml::Value::Table(given), Some(toml::Value::Table(known))) => {
                unknown_key(given, known, &format!("{path}."))
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use model::HuginnConfig;

    use super::*;
    use crate::data::{DataConfig, TokenizerSource};
    use crate::depth::DepthScheme;
    use crate::run::OptimizerConfig;
    use crate::schedule::Schedule;

    fn config() -> RunConfig {
        RunConfig {
            model: HuginnConfig::tiny(300, 32, 4, (1, 2, 1)),
            data: DataConfig::Text {
                files: vec![PathBuf::from("a.jsonl")],
                field: "body".into(),
                tokenizer: TokenizerSource::Train { vocab_size: 300 },
                seq_len: 64,
            },
            seed: 5,
            steps: 100,
            batch_size: 8,
            accumulation: 2,
            depth: DepthScheme::Fixed { steps: 4, backprop: 2 },
            optimizer: OptimizerConfig::AdamW {
                beta_1: 0.9,
                beta_2: 0.95,
                epsilon: 1e-8,
                weight_decay: 0.1,
            },
            schedule: Schedule::Trapezoid {
                peak_lr: 3e-4,
                warmup: 10,
                total_steps: 100,
                cooldown: 20,
                min_lr: 3e-5,
            },
            max_grad_norm: None,
            eval_every: 10,
            eval_rows: 16,
            eval_depths: vec![1, 4, 16],
            checkpoint_every: 50,
            keep_checkpoints: 2,
            init_from: None,
            devices: Vec::new(),
        }
    }

    #[test]
    fn a_configuration_reads_back_from_its_toml() {
        let config = config();
        let text = config.to_toml().unwrap();
        assert_eq!(RunConfig::from_toml(&text).unwrap(), config);
        assert!(!text.contains("max_grad_norm"), "no clipping is no key:\n{text}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let text = config().to_toml().unwrap();
        let typo = text.replace("n_heads", "n_haeds");
        assert_eq!(RunConfig::from_toml(&typo).unwrap_err(), "unknown key `model.n_haeds`");
        // A field of another depth scheme is unknown too, not ignored.
        let other = text.replace("[depth]\n", "[depth]\nmean = 4\n");
        assert_eq!(RunConfig::from_toml(&other).unwrap_err(), "unknown key `depth.mean`");
        let top = format!("stpes = 3\n{text}");
        assert_eq!(RunConfig::from_toml(&top).unwrap_err(), "unknown key `stpes`");
        let wrong = text.replace("batch_size = 8", "batch_size = \"eight\"");
        let line = wrong.lines().position(|l| l.starts_with("batch_size")).unwrap() + 1;
        let err = RunConfig::from_toml(&wrong).unwrap_err();
        assert!(err.starts_with(&format!("line {line}: invalid type: string")), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, typo).unwrap();
        let err = RunConfig::from_toml_file(&path).unwrap_err().to_string();
        assert_eq!(err, format!("{}: unknown key `model.n_haeds`", path.display()));
        let err = RunConfig::from_toml_file(&dir.path().join("none.toml")).unwrap_err();
        assert!(err.to_string().contains("none.toml"), "{err}");
    }

    #[test]
    fn a_number_too_large_names_its_key() {
        let text = config().to_toml().unwrap();
        for (from, to, key) in [
            ("\nsteps = 100", "\nsteps = 18446744073709551616", "steps"),
            ("n_embd = 32", "n_embd = 99999999999999999999", "model.n_embd"),
            ("seed = 5", "seed = -1", "seed"),
        ] {
            let err = RunConfig::from_toml(&text.replace(from, to)).unwrap_err();
            assert!(err.starts_with("line ") && err.contains(&format!("`{key}`")), "{err}");
        }
    }

    #[test]
    fn seeds_beyond_toml_integers_are_refused_when_written() {
        let config = RunConfig {
            seed: u64::MAX,
            ..config()
        };
        let err = config.to_toml().unwrap_err();
        assert!(err.contains("does not read back"), "{err}");
    }
}
