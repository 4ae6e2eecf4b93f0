//! A run's metrics: one JSON object per line in `metrics.jsonl` (the record), and the same
//! records as rows of `metrics.csv` (long format: one column per quantity, empty where a kind
//! of record has none) for spreadsheets and plotting tools.
//!
//! Lines are flushed as they are written. On resume both files are cut back to the records of
//! steps up to the checkpoint's, so a run that crashed after its last checkpoint does not log
//! the lost steps twice; a half-written last line is dropped.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One logged record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Record {
    /// An optimizer step (`step` counts from 1).
    Train {
        step: u64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        /// Total recurrence steps of this optimizer step, and how many carried gradient.
        recurrence: usize,
        backprop: usize,
        tokens_per_second: f64,
        elapsed_seconds: f64,
    },
    /// A held-out evaluation at a fixed depth.
    Eval {
        step: u64,
        split: String,
        depth: usize,
        loss: f64,
        accuracy: Option<f64>,
    },
    /// The latent-state monitors at the training mean depth.
    Monitor {
        step: u64,
        depth: usize,
        relative_residual: f64,
        token_correlation: f64,
    },
}

impl Record {
    pub fn step(&self) -> u64 {
        match self {
            Record::Train { step, .. } | Record::Eval { step, .. } | Record::Monitor { step, .. } => *step,
        }
    }
}

const CSV_HEADER: [&str; 14] = [
    "kind",
    "step",
    "loss",
    "lr",
    "grad_norm",
    "recurrence",
    "backprop",
    "tokens_per_second",
    "elapsed_seconds",
    "split",
    "depth",
    "accuracy",
    "relative_residual",
    "token_correlation",
];

fn csv_row(record: &Record) -> [String; 14] {
    let f = |x: f64| x.to_string();
    let none = String::new;
    match record {
        Record::Train {
            step,
            loss,
            lr,
            grad_norm,
            recurrence,
            backprop,
            tokens_per_second,
            elapsed_seconds,
        } => [
            "train".into(),
            step.to_string(),
            f(*loss),
            f(*lr),
            f(*grad_norm),
            recurrence.to_string(),
            backprop.to_string(),
            f(*tokens_per_second),
            f(*elapsed_seconds),
            none(),
            none(),
            none(),
            none(),
            none(),
        ],
        Record::Eval {
            step,
            split,
            depth,
            loss,
            accuracy,
        } => [
            "eval".into(),
            step.to_string(),
            f(*loss),
            none(),
            none(),
            none(),
            none(),
            none(),
            none(),
            split.clone(),
            depth.to_string(),
            accuracy.map(f).unwrap_or_default(),
            none(),
            none(),
        ],
        Record::Monitor {
            step,
            depth,
            relative_residual,
            token_correlation,
        } => [
            "monitor".into(),
            step.to_string(),
            none(),
            none(),
            none(),
            none(),
            none(),
            none(),
            none(),
            none(),
            depth.to_string(),
            none(),
            f(*relative_residual),
            f(*token_correlation),
        ],
    }
}

/// Appends records to a run's `metrics.jsonl` and `metrics.csv`.
pub struct MetricsLog {
    jsonl: File,
    csv: csv::Writer<File>,
}

impl MetricsLog {
    pub fn jsonl_path(dir: &Path) -> PathBuf {
        dir.join("metrics.jsonl")
    }

    pub fn csv_path(dir: &Path) -> PathBuf {
        dir.join("metrics.csv")
    }

    /// Opens the logs of the run in `dir`, keeping the records of steps `<= keep_through`
    /// (everything after them is from steps that will run again).
    pub fn open(dir: &Path, keep_through: u64) -> std::io::Result<Self> {
        let kept: Vec<Record> = read(&Self::jsonl_path(dir))
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.step() <= keep_through)
            .collect();
        // Rewrite both files from the kept records, through a temporary file each.
        let mut text = String::new();
        for r in &kept {
            text.push_str(&serde_json::to_string(r).map_err(std::io::Error::other)?);
            text.push('\n');
        }
        write_atomically(&Self::jsonl_path(dir), text.as_bytes())?;
        let mut table = csv::Writer::from_writer(Vec::new());
        table.write_record(CSV_HEADER).map_err(std::io::Error::other)?;
        for r in &kept {
            table.write_record(csv_row(r)).map_err(std::io::Error::other)?;
        }
        write_atomically(
            &Self::csv_path(dir),
            &table.into_inner().map_err(|e| std::io::Error::other(e.to_string()))?,
        )?;
        let append = |path: PathBuf| OpenOptions::new().append(true).open(path);
        Ok(Self {
            jsonl: append(Self::jsonl_path(dir))?,
            csv: csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(append(Self::csv_path(dir))?),
        })
    }

    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
        self.jsonl.write_all(format!("{line}\n").as_bytes())?;
        self.jsonl.flush()?;
        self.csv.write_record(csv_row(record)).map_err(std::io::Error::other)?;
        self.csv.flush()
    }
}

/// The records of a `metrics.jsonl`, skipping a torn last line.
pub fn read(path: &Path) -> std::io::Result<Vec<Record>> {
    let file = File::open(path)?;
    let mut records = Vec::new();
    for line in BufReader::new(file).lines() {
        if let Ok(record) = serde_json::from_str(&line?) {
            records.push(record);
        }
    }
    Ok(records)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// `path` always holds either its old or its new content in full.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(step: u64) -> Record {
        Record::Train {
            step,
            loss: 1.0 / step as f64,
            lr: 1e-3,
            grad_norm: 0.5,
            recurrence: 7,
            backprop: 3,
            tokens_per_second: 100.0,
            elapsed_seconds: step as f64,
        }
    }

    #[test]
    fn reopening_cuts_back_to_the_checkpoint_and_both_files_agree() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), 0).unwrap();
        for step in 1..=5 {
            log.write(&train(step)).unwrap();
        }
        log.write(&Record::Eval {
            step: 4,
            split: "test".into(),
            depth: 8,
            loss: 0.3,
            accuracy: Some(0.75),
        })
        .unwrap();
        drop(log);
        // A torn line from a crash mid-write.
        let path = MetricsLog::jsonl_path(dir.path());
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"kind\":\"train\",\"st").unwrap();
        drop(f);
        let mut log = MetricsLog::open(dir.path(), 4).unwrap();
        log.write(&train(5)).unwrap();
        let records = read(&path).unwrap();
        assert_eq!(records.iter().map(Record::step).collect::<Vec<_>>(), [1, 2, 3, 4, 4, 5]);
        let csv = std::fs::read_to_string(MetricsLog::csv_path(dir.path())).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 7);
        assert!(lines[0].starts_with("kind,step,loss"));
        assert_eq!(lines[5], "eval,4,0.3,,,,,,,test,8,0.75,,");
        assert!(lines[6].starts_with("train,5,0.2,"));
    }
}
