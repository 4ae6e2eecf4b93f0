//! A run's metrics: one JSON object per line in `metrics.jsonl` (the record), and the same
//! records as rows of `metrics.csv` (long format: one column per quantity, empty where a kind
//! of record has none) for spreadsheets and plotting tools.
//!
//! Lines are flushed as they are written and synced before every checkpoint. Logged bytes are
//! never rewritten: on resume both files are only cut back, at a line boundary, to the records
//! of steps up to the checkpoint's (the later steps run again and log themselves again), and a
//! half-written last line is dropped. Neither log loses a record the other holds: where one
//! ends early (a crash between the two writes, a deleted, emptied or cut file), the records it
//! lacks are rebuilt from the other, number by number from the literal text, so each is the
//! line or row the run would have written. A line in the middle that is not a record, or two
//! logs holding different records at the same line, stops the resume with the line number and
//! leaves both files as they are.

use std::fs::{File, OpenOptions};
use std::io::Write;
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
    /// The `kind` both logs write.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::Train { .. } => "train",
            Record::Eval { .. } => "eval",
            Record::Monitor { .. } => "monitor",
        }
    }

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
    // Empty where JSON writes `null`, so a row rebuilt from its JSON line is the same.
    let f = |x: f64| if x.is_finite() { x.to_string() } else { String::new() };
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
            record.kind().into(),
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
            record.kind().into(),
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
            record.kind().into(),
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

/// Why a run's metrics could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// (`error`, not `source`: the message says it, so error chains need not repeat it.)
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error(
        "{path}: line {line} is not a metrics record ({reason}); both logs are left as they are: \
         repair or remove that line, then resume"
    )]
    Corrupt { path: PathBuf, line: usize, reason: String },
    #[error(
        "{jsonl}: line {line} and {csv}: line {row} hold different records ({reason}); both logs \
         are left as they are: remove the wrong one's lines from there on, then resume to rebuild \
         them from the other"
    )]
    Disagree {
        jsonl: PathBuf,
        line: usize,
        csv: PathBuf,
        row: usize,
        reason: String,
    },
    #[error(
        "{path}: the first line is not the expected header; the file is left as it is: move it \
         aside and resume to rebuild it from metrics.jsonl"
    )]
    Header { path: PathBuf },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> MetricsError + '_ {
    move |error| MetricsError::Io {
        path: path.to_path_buf(),
        error,
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
    /// (everything after them is from steps that will run again), each log completed from the
    /// other.
    pub fn open(dir: &Path, keep_through: u64) -> Result<Self, MetricsError> {
        let jsonl_path = Self::jsonl_path(dir);
        let jsonl_bytes = read_bytes(&jsonl_path)?;
        let lines = complete_lines(&jsonl_bytes);
        let mut keys = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let key = key_of(line.text).map_err(|reason| MetricsError::Corrupt {
                path: jsonl_path.clone(),
                line: i + 1,
                reason,
            })?;
            if key.step > keep_through {
                break;
            }
            keys.push(key);
        }

        let csv_path = Self::csv_path(dir);
        let header = CSV_HEADER.join(",");
        let csv_bytes = read_bytes(&csv_path)?;
        let table = complete_lines(&csv_bytes);
        let mut rows = Vec::new();
        match table.first() {
            None => {}
            Some(first) if first.text == header.as_bytes() => {
                for (i, line) in table.iter().enumerate().skip(1) {
                    let record = record_from_csv(line.text).map_err(|reason| MetricsError::Corrupt {
                        path: csv_path.clone(),
                        line: i + 1,
                        reason,
                    })?;
                    if record.step() > keep_through {
                        break;
                    }
                    rows.push(record);
                }
            }
            Some(_) => return Err(MetricsError::Header { path: csv_path }),
        }
        for (i, (key, row)) in keys.iter().zip(&rows).enumerate() {
            if (key.kind.as_str(), key.step) != (row.kind(), row.step()) {
                return Err(MetricsError::Disagree {
                    jsonl: jsonl_path,
                    line: i + 1,
                    csv: csv_path,
                    row: i + 2,
                    reason: format!(
                        "{} of step {} against {} of step {}",
                        key.kind,
                        key.step,
                        row.kind(),
                        row.step()
                    ),
                });
            }
        }

        let jsonl_end = keys.len().checked_sub(1).map_or(0, |last| lines[last].end);
        let mut jsonl = open_cut(&jsonl_path, jsonl_end)?;
        // Lines the JSONL lost (emptied, cut short) that the CSV still holds.
        for record in rows.iter().skip(keys.len()) {
            let line = serde_json::to_string(record).map_err(|e| io(&jsonl_path)(e.into()))?;
            jsonl
                .write_all(format!("{line}\n").as_bytes())
                .map_err(io(&jsonl_path))?;
        }
        let csv_end = table.get(rows.len()).map_or(0, |line| line.end);
        let mut csv_file = open_cut(&csv_path, csv_end)?;
        if csv_end == 0 {
            csv_file
                .write_all(format!("{header}\n").as_bytes())
                .map_err(io(&csv_path))?;
        }
        // Rows the CSV lacks (a crash between the two writes, a deleted or cut CSV).
        for (i, line) in lines.iter().enumerate().take(keys.len()).skip(rows.len()) {
            let row = csv_row_from_json(line.text).map_err(|reason| MetricsError::Corrupt {
                path: jsonl_path.clone(),
                line: i + 1,
                reason,
            })?;
            let mut out = csv::Writer::from_writer(Vec::new());
            out.write_record(&row).map_err(|e| io(&csv_path)(e.into()))?;
            let bytes = out.into_inner().map_err(|e| io(&csv_path)(e.into_error()))?;
            csv_file.write_all(&bytes).map_err(io(&csv_path))?;
        }
        Ok(Self {
            jsonl,
            csv: csv::WriterBuilder::new().has_headers(false).from_writer(csv_file),
        })
    }

    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
        self.jsonl.write_all(format!("{line}\n").as_bytes())?;
        self.jsonl.flush()?;
        model::pause::pause_point("metrics-between-files");
        self.csv.write_record(csv_row(record)).map_err(std::io::Error::other)?;
        self.csv.flush()
    }

    /// Makes everything logged so far durable (before a checkpoint claims those steps).
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.jsonl.sync_data()?;
        self.csv.flush()?;
        self.csv.get_ref().sync_data()
    }
}

/// A line of a log file, without its newline, and the offset just past the newline.
struct Line<'a> {
    text: &'a [u8],
    end: u64,
}

/// The bytes of a log file (none if it does not exist).
fn read_bytes(path: &Path) -> Result<Vec<u8>, MetricsError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(path)(e)),
    }
}

/// The complete lines of a log; a last line without its newline (torn by a crash) is not one.
fn complete_lines(bytes: &[u8]) -> Vec<Line<'_>> {
    let mut lines = Vec::new();
    let mut start = 0;
    while let Some(n) = bytes[start..].iter().position(|&b| b == b'\n') {
        lines.push(Line {
            text: &bytes[start..start + n],
            end: (start + n + 1) as u64,
        });
        start += n + 1;
    }
    lines
}

/// Opens `path` for appending after cutting it to its first `len` bytes (created if absent);
/// the bytes before `len` are not touched.
fn open_cut(path: &Path, len: u64) -> Result<File, MetricsError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    if file.metadata().map_err(io(path))?.len() != len {
        file.set_len(len).map_err(io(path))?;
        file.sync_data().map_err(io(path))?;
    }
    Ok(file)
}

/// What identifies a record: its kind and step.
#[derive(Deserialize)]
struct Key {
    kind: String,
    step: u64,
}

/// The kind and step of one JSON line, or why it is not a record.
fn key_of(line: &[u8]) -> Result<Key, String> {
    serde_json::from_slice::<Key>(line).map_err(|e| e.to_string())
}

/// The record of a CSV row: each number parsed from the row's text, which [`csv_row`] printed
/// as the shortest text that reads back exactly, so the record serializes to the JSON line
/// the run wrote (an empty cell is a non-finite number, which JSON writes as `null`).
fn record_from_csv(line: &[u8]) -> Result<Record, String> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).from_reader(line);
    let mut row = csv::StringRecord::new();
    if !reader.read_record(&mut row).map_err(|e| e.to_string())? || row.len() != CSV_HEADER.len() {
        return Err(format!("not a row of {} cells", CSV_HEADER.len()));
    }
    let cell = |column: &str| {
        let i = CSV_HEADER.iter().position(|c| *c == column).expect("a column");
        &row[i]
    };
    let number = |column: &str| match cell(column) {
        "" => Ok(f64::NAN),
        text => text.parse::<f64>().map_err(|e| format!("`{column}`: {e}")),
    };
    let count = |column: &str| cell(column).parse::<usize>().map_err(|e| format!("`{column}`: {e}"));
    let step = cell("step").parse::<u64>().map_err(|e| format!("`step`: {e}"))?;
    Ok(match cell("kind") {
        "train" => Record::Train {
            step,
            loss: number("loss")?,
            lr: number("lr")?,
            grad_norm: number("grad_norm")?,
            recurrence: count("recurrence")?,
            backprop: count("backprop")?,
            tokens_per_second: number("tokens_per_second")?,
            elapsed_seconds: number("elapsed_seconds")?,
        },
        "eval" => Record::Eval {
            step,
            split: cell("split").to_string(),
            depth: count("depth")?,
            loss: number("loss")?,
            accuracy: match cell("accuracy") {
                "" => None,
                _ => Some(number("accuracy")?),
            },
        },
        "monitor" => Record::Monitor {
            step,
            depth: count("depth")?,
            relative_residual: number("relative_residual")?,
            token_correlation: number("token_correlation")?,
        },
        kind => return Err(format!("unknown kind {kind:?}")),
    })
}

/// The CSV row of a record's JSON line, cell by cell from the JSON's literal text: a number is
/// parsed by Rust's exact parser and printed as [`csv_row`] prints it, so the row is the one
/// the record wrote (serde_json's own float parser may be an ulp off).
fn csv_row_from_json(line: &[u8]) -> Result<Vec<String>, String> {
    let fields: std::collections::BTreeMap<&str, &serde_json::value::RawValue> =
        serde_json::from_slice(line).map_err(|e| e.to_string())?;
    CSV_HEADER
        .iter()
        .map(|column| {
            let Some(raw) = fields.get(column) else {
                return Ok(String::new());
            };
            let text = raw.get();
            match text.as_bytes().first() {
                Some(b'"') => serde_json::from_str::<String>(text).map_err(|e| e.to_string()),
                Some(b'n') => Ok(String::new()),
                _ => text
                    .parse::<f64>()
                    .map(|x| x.to_string())
                    .map_err(|e| format!("`{column}`: {e}")),
            }
        })
        .collect()
}

/// The records of a `metrics.jsonl`, without a torn last line (a run may be writing it). A
/// line in the middle that is not a record is an error naming it.
pub fn read(path: &Path) -> Result<Vec<Record>, MetricsError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    complete_lines(&bytes)
        .iter()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_slice(line.text).map_err(|e| MetricsError::Corrupt {
                path: path.to_path_buf(),
                line: i + 1,
                reason: e.to_string(),
            })
        })
        .collect()
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
    use rand::{Rng, SeedableRng};

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

    /// Values whose JSON text serde_json's default parser does not read back exactly.
    fn awkward(step: u64) -> Record {
        Record::Train {
            step,
            loss: f64::from(2.712_529_7_f32) + step as f64,
            lr: 0.000_109_999_999_999_999_99,
            grad_norm: 0.1 + 0.2,
            recurrence: 7,
            backprop: 3,
            tokens_per_second: 1.0 / 3.0,
            elapsed_seconds: 1e-300 * step as f64,
        }
    }

    fn eval(step: u64) -> Record {
        Record::Eval {
            step,
            split: "test".into(),
            depth: 8,
            loss: 0.3,
            accuracy: Some(0.75),
        }
    }

    fn bytes(dir: &Path) -> (Vec<u8>, Vec<u8>) {
        (
            std::fs::read(MetricsLog::jsonl_path(dir)).unwrap(),
            std::fs::read(MetricsLog::csv_path(dir)).unwrap(),
        )
    }

    fn append(path: &Path, bytes: &[u8]) {
        OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    /// Steps 1..=5 of awkward train records, an eval at 4.
    fn logged(dir: &Path) {
        let mut log = MetricsLog::open(dir, 0).unwrap();
        for step in 1..=5 {
            log.write(&awkward(step)).unwrap();
            if step == 4 {
                log.write(&eval(4)).unwrap();
            }
        }
    }

    #[test]
    fn reopening_cuts_back_to_the_checkpoint_and_both_files_agree() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), 0).unwrap();
        for step in 1..=5 {
            log.write(&train(step)).unwrap();
        }
        log.write(&eval(4)).unwrap();
        drop(log);
        // A torn line from a crash mid-write.
        let path = MetricsLog::jsonl_path(dir.path());
        append(&path, b"{\"kind\":\"train\",\"st");
        let mut log = MetricsLog::open(dir.path(), 4).unwrap();
        log.write(&train(5)).unwrap();
        let records = read(&path).unwrap();
        assert_eq!(records.iter().map(Record::step).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        let csv = std::fs::read_to_string(MetricsLog::csv_path(dir.path())).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 6);
        assert!(lines[0].starts_with("kind,step,loss"));
        assert!(lines[4].starts_with("train,4,0.25,"));
        assert!(lines[5].starts_with("train,5,0.2,"));
    }

    #[test]
    fn reopening_never_rewrites_a_logged_byte() {
        let dir = tempfile::tempdir().unwrap();
        logged(dir.path());
        let (jsonl, csv) = bytes(dir.path());
        // A resume of a finished run keeps everything, byte for byte.
        drop(MetricsLog::open(dir.path(), 5).unwrap());
        assert_eq!(bytes(dir.path()), (jsonl.clone(), csv.clone()));
        // A resume from step 4 cuts at a line boundary: what is left is a prefix.
        drop(MetricsLog::open(dir.path(), 4).unwrap());
        let (cut_jsonl, cut_csv) = bytes(dir.path());
        assert_eq!(complete_lines(&cut_jsonl).len(), 5);
        assert_eq!(complete_lines(&cut_csv).len(), 6);
        assert!(jsonl.starts_with(&cut_jsonl) && csv.starts_with(&cut_csv));
        // Running step 5 again logs the same bytes as the first time.
        MetricsLog::open(dir.path(), 4).unwrap().write(&awkward(5)).unwrap();
        assert_eq!(bytes(dir.path()), (jsonl, csv));
    }

    #[test]
    fn an_undecodable_tail_is_dropped_and_a_corrupt_line_stops_the_resume_untouched() {
        let dir = tempfile::tempdir().unwrap();
        logged(dir.path());
        let (jsonl, csv) = bytes(dir.path());
        let path = MetricsLog::jsonl_path(dir.path());
        // One byte that is not UTF-8, torn (no newline): dropped, nothing else lost.
        append(&path, &[0xFF]);
        drop(MetricsLog::open(dir.path(), 5).unwrap());
        assert_eq!(bytes(dir.path()), (jsonl.clone(), csv.clone()));
        // The same as a whole line: an error naming the line, and both files as they were.
        append(&path, &[0xFF, b'\n']);
        let (damaged, _) = bytes(dir.path());
        let err = MetricsLog::open(dir.path(), 5).err().unwrap();
        assert!(matches!(err, MetricsError::Corrupt { line: 7, .. }), "{err}");
        assert!(err.to_string().contains("line 7"), "{err}");
        assert_eq!(bytes(dir.path()), (damaged, csv));
        assert!(matches!(read(&path), Err(MetricsError::Corrupt { line: 7, .. })));
    }

    #[test]
    fn csv_rows_a_crash_kept_from_being_written_are_rebuilt_exactly() {
        let dir = tempfile::tempdir().unwrap();
        logged(dir.path());
        let (jsonl, csv) = bytes(dir.path());
        let csv_path = MetricsLog::csv_path(dir.path());
        // Killed between the JSON line and its CSV row: the last row is missing, or torn.
        let lines = complete_lines(&csv);
        let without_last = &csv[..lines[lines.len() - 2].end as usize];
        for damaged in [
            without_last.to_vec(),
            [without_last, b"train,5,3.7"].concat(),
            Vec::new(),
        ] {
            std::fs::write(&csv_path, &damaged).unwrap();
            drop(MetricsLog::open(dir.path(), 5).unwrap());
            assert_eq!(bytes(dir.path()), (jsonl.clone(), csv.clone()));
        }
        std::fs::remove_file(&csv_path).unwrap();
        drop(MetricsLog::open(dir.path(), 5).unwrap());
        assert_eq!(bytes(dir.path()), (jsonl.clone(), csv.clone()));
        // A CSV that is not ours is left alone.
        std::fs::write(&csv_path, "date,value\n").unwrap();
        let err = MetricsLog::open(dir.path(), 5).err().unwrap();
        assert!(matches!(err, MetricsError::Header { .. }), "{err}");
        assert_eq!(std::fs::read(&csv_path).unwrap(), b"date,value\n");
    }

    #[test]
    fn a_damaged_jsonl_is_rebuilt_from_the_csv_and_no_row_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        logged(dir.path());
        let (jsonl, csv) = bytes(dir.path());
        let path = MetricsLog::jsonl_path(dir.path());
        let lines = complete_lines(&jsonl);
        // Emptied, cut to two lines, cut in the middle of the fourth, deleted.
        for damaged in [
            Vec::new(),
            jsonl[..lines[1].end as usize].to_vec(),
            jsonl[..lines[2].end as usize + 7].to_vec(),
        ] {
            std::fs::write(&path, &damaged).unwrap();
            drop(MetricsLog::open(dir.path(), 5).unwrap());
            assert_eq!(bytes(dir.path()), (jsonl.clone(), csv.clone()));
        }
        std::fs::remove_file(&path).unwrap();
        drop(MetricsLog::open(dir.path(), 5).unwrap());
        assert_eq!(bytes(dir.path()), (jsonl.clone(), csv.clone()));
        // Resuming from step 4 with the JSONL emptied keeps both logs' records of steps 1..=4.
        std::fs::write(&path, b"").unwrap();
        drop(MetricsLog::open(dir.path(), 4).unwrap());
        let (cut_jsonl, cut_csv) = bytes(dir.path());
        assert_eq!(
            (complete_lines(&cut_jsonl).len(), complete_lines(&cut_csv).len()),
            (5, 6)
        );
        assert!(jsonl.starts_with(&cut_jsonl) && csv.starts_with(&cut_csv));
    }

    #[test]
    fn logs_that_disagree_or_a_damaged_csv_row_stop_the_resume_untouched() {
        let dir = tempfile::tempdir().unwrap();
        logged(dir.path());
        let (jsonl, csv) = bytes(dir.path());
        let csv_path = MetricsLog::csv_path(dir.path());
        let lines = complete_lines(&csv);
        // A garbled row in the middle of the CSV: an error naming it.
        let at = lines[2].end as usize;
        let garbled = [&csv[..at], b"train,3,x\n", &csv[lines[3].end as usize..]].concat();
        std::fs::write(&csv_path, &garbled).unwrap();
        let err = MetricsLog::open(dir.path(), 5).err().unwrap();
        assert!(matches!(err, MetricsError::Corrupt { line: 4, .. }), "{err}");
        assert_eq!(bytes(dir.path()), (jsonl.clone(), garbled));
        // A row of another step where the JSONL has step 2's record.
        let other = [&csv[..lines[1].end as usize], &csv[lines[2].end as usize..]].concat();
        std::fs::write(&csv_path, &other).unwrap();
        let err = MetricsLog::open(dir.path(), 5).err().unwrap();
        assert!(matches!(err, MetricsError::Disagree { line: 2, row: 3, .. }), "{err}");
        assert_eq!(bytes(dir.path()), (jsonl, other));
    }

    /// 2000 records of every kind with random floats: raw bit patterns (NaN, infinities,
    /// subnormals), f32 values, signed fractions and small decimals.
    fn random_records(seed: u64) -> Vec<Record> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut x = || {
            let bits: u64 = rng.random();
            match bits % 4 {
                0 => f64::from_bits(bits),
                1 => f64::from(f32::from_bits(bits as u32)),
                2 => ((bits % 2000) as f64 - 1000.0) / 7.0,
                _ => 1e-6 * (bits % 100_000) as f64,
            }
        };
        (0..2000)
            .map(|step| match step % 3 {
                0 => Record::Train {
                    step,
                    loss: x(),
                    lr: x(),
                    grad_norm: x(),
                    recurrence: 7,
                    backprop: 3,
                    tokens_per_second: x(),
                    elapsed_seconds: x(),
                },
                1 => Record::Eval {
                    step,
                    split: "hard, \"quoted\"".into(),
                    depth: 16,
                    loss: x(),
                    accuracy: (step % 2 == 0).then(&mut x),
                },
                _ => Record::Monitor {
                    step,
                    depth: 8,
                    relative_residual: x(),
                    token_correlation: x(),
                },
            })
            .collect()
    }

    #[test]
    fn a_line_rebuilt_from_csv_is_the_line_written() {
        for record in random_records(11) {
            let mut out = csv::Writer::from_writer(Vec::new());
            out.write_record(csv_row(&record)).unwrap();
            let row = out.into_inner().unwrap();
            let rebuilt = record_from_csv(&row[..row.len() - 1]).unwrap();
            assert_eq!(
                serde_json::to_string(&rebuilt).unwrap(),
                serde_json::to_string(&record).unwrap()
            );
        }
    }

    #[test]
    fn a_row_rebuilt_from_json_is_the_row_written() {
        for record in random_records(7) {
            let json = serde_json::to_string(&record).unwrap();
            assert_eq!(
                csv_row_from_json(json.as_bytes()).unwrap(),
                csv_row(&record).to_vec(),
                "{json}"
            );
        }
    }
}
