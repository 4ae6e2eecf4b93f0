//! Loading a model folder from generated bad inputs: truncated, corrupted and lying safetensors
//! files, inconsistent shard indexes, broken Burn records. Every case must end in an error of
//! one non-empty line (as a binary prints it, sources included), never in a panic, and never in
//! a model whose weights differ from the ones written.

mod common;

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use model::burn::prelude::*;
use model::{Huginn, HuginnConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};

use common::chain;

fn tiny() -> HuginnConfig {
    HuginnConfig::tiny(48, 16, 2, (1, 2, 1))
}

/// Every weight of a model, as the bytes the reference layout stores.
fn weights(model: &Huginn) -> Vec<u8> {
    model
        .reference_params()
        .iter()
        .flat_map(|(_, param)| param.entry().bytes)
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// The input is wrong: loading must fail.
    Error,
    /// The change may be harmless (a header byte that is still JSON whitespace, say): loading
    /// fails or gives the weights that were written.
    ErrorOrSame,
    /// Anything but a panic or a bad message: a Burn record has no checksum, so a flipped
    /// offset loads other (finite) bytes.
    NoPanic,
}

/// Loads a folder once per case and collects what went wrong.
struct Run {
    dir: PathBuf,
    written: Vec<u8>,
    cases: usize,
    failures: Vec<String>,
}

impl Run {
    /// A tiny model saved into a fresh folder by `save`.
    fn new(save: impl FnOnce(&Huginn, &Path)) -> (tempfile::TempDir, Self) {
        Self::of(tiny().init(&Device::flex(), 7), save)
    }

    /// `model` saved into a fresh folder by `save`.
    fn of(model: Huginn, save: impl FnOnce(&Huginn, &Path)) -> (tempfile::TempDir, Self) {
        let dir = tempfile::tempdir().unwrap();
        save(&model, dir.path());
        let run = Self {
            dir: dir.path().to_path_buf(),
            written: weights(&model),
            cases: 0,
            failures: Vec::new(),
        };
        (dir, run)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }

    /// Loads the folder with `file` holding `contents`, then puts the file back.
    fn case(&mut self, name: impl FnOnce() -> String, file: &str, contents: &[u8], expect: Expect) {
        let path = self.path(file);
        let original = std::fs::read(&path).unwrap();
        put(&path, contents);
        self.check(name, expect);
        put(&path, &original);
    }

    /// Loads the folder as it is.
    fn check(&mut self, name: impl FnOnce() -> String, expect: Expect) {
        self.cases += 1;
        let loaded = catch_unwind(AssertUnwindSafe(|| Huginn::from_pretrained(&self.dir, &Device::flex())));
        let failure = match loaded {
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                Some(format!("panicked: {}", message.unwrap_or_default()))
            }
            Ok(Err(err)) => {
                let text = chain(&err);
                let bad = text.trim().is_empty() || text.contains('\n') || text.matches("os error").count() > 1;
                bad.then(|| format!("bad message {text:?}"))
            }
            Ok(Ok(model)) => match expect {
                Expect::Error => Some("accepted".into()),
                Expect::ErrorOrSame if weights(&model) != self.written => Some("accepted, other weights".into()),
                _ => None,
            },
        };
        if let Some(failure) = failure {
            self.failures.push(format!("{}: {failure}", name()));
        }
    }

    fn finish(self, at_least: usize) {
        let shown: Vec<&str> = self.failures.iter().take(40).map(String::as_str).collect();
        assert!(
            self.failures.is_empty(),
            "{} of {} cases failed:\n{}",
            self.failures.len(),
            self.cases,
            shown.join("\n")
        );
        assert!(self.cases >= at_least, "only {} cases", self.cases);
    }
}

/// Overwrites a file in place. `std::fs::write` truncates to zero first, and ext4 flushes a file
/// rewritten that way when it is closed, which made the cases wait on the disk.
fn put(path: &Path, contents: &[u8]) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all(contents).unwrap();
    file.set_len(contents.len() as u64).unwrap();
}

/// A safetensors file taken apart: the JSON header and the data after it.
struct Parts {
    header: serde_json::Map<String, Value>,
    header_len: usize,
    data: Vec<u8>,
}

impl Parts {
    fn of(bytes: &[u8]) -> Self {
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        Self {
            header,
            header_len,
            data: bytes[8 + header_len..].to_vec(),
        }
    }

    /// Tensor names with their data offsets, in file order.
    fn tensors(&self) -> Vec<(String, usize, usize)> {
        let mut tensors: Vec<(String, usize, usize)> = self
            .header
            .iter()
            .filter(|(name, _)| *name != "__metadata__")
            .map(|(name, info)| {
                let offsets = &info["data_offsets"];
                let offset = |i: usize| offsets[i].as_u64().unwrap() as usize;
                (name.clone(), offset(0), offset(1))
            })
            .collect();
        tensors.sort_by_key(|t| t.1);
        tensors
    }
}

/// A safetensors file from a header and data, with the header's true length in front.
fn assemble(header: &serde_json::Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap();
    [&(json.len() as u64).to_le_bytes()[..], &json, data].concat()
}

/// Raw tensors of a safetensors file: name → (dtype, shape, bytes).
type Raw = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_raw(bytes: &[u8]) -> Raw {
    let file = safetensors::SafeTensors::deserialize(bytes).unwrap();
    file.iter()
        .map(|(k, v)| (k.to_string(), (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_raw(raw: &Raw) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(k, (dtype, shape, data))| (k.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

const DTYPES: [&str; 10] = ["F16", "BF16", "F64", "I32", "U8", "BOOL", "I64", "F8_E4M3", "F4", "F33"];

#[test]
fn bad_safetensors_files_are_one_line_errors() {
    const FILE: &str = "model.safetensors";
    let (_dir, mut run) = Run::new(|model, dir| model.export_hf(dir, usize::MAX).unwrap());
    let bytes = run.read(FILE);
    let parts = Parts::of(&bytes);
    let tensors = parts.tensors();
    let data_start = 8 + parts.header_len;
    let mut rng = ChaCha8Rng::seed_from_u64(15);

    // Truncated inside the length, inside the header, and at (and next to) each tensor's ends.
    let mut cuts: Vec<usize> = (0..=data_start).collect();
    for (_, start, end) in &tensors {
        for at in [start, end] {
            cuts.extend([data_start + at - 1, data_start + at, data_start + at + 1]);
        }
    }
    cuts.retain(|&cut| cut < bytes.len());
    cuts.sort();
    cuts.dedup();
    for cut in cuts {
        run.case(|| format!("cut at {cut}"), FILE, &bytes[..cut], Expect::Error);
    }
    run.case(
        || "a byte appended".into(),
        FILE,
        &[&bytes[..], &[0]].concat(),
        Expect::Error,
    );

    // The length in front lies.
    let n = parts.header_len as u64;
    for claimed in [0, 1, n - 1, n + 1, n + 8, bytes.len() as u64, u64::MAX / 2, u64::MAX] {
        let mut lying = bytes.clone();
        lying[..8].copy_from_slice(&claimed.to_le_bytes());
        run.case(|| format!("header length {claimed}"), FILE, &lying, Expect::Error);
    }

    // Random bytes in the length and the header (some only change JSON whitespace).
    for i in 0..1500 {
        let mut noisy = bytes.clone();
        for _ in 0..rng.random_range(1..=3) {
            noisy[rng.random_range(0..data_start)] = rng.random();
        }
        run.case(
            || format!("random header bytes #{i}"),
            FILE,
            &noisy,
            Expect::ErrorOrSame,
        );
    }

    // Each tensor's header entry lies: dtype, shape or offsets no longer fit the data.
    let total = parts.data.len() as i128;
    for (name, start, end) in &tensors {
        let (start, end) = (*start as i128, *end as i128);
        let shape: Vec<usize> = serde_json::from_value(parts.header[name]["shape"].clone()).unwrap();
        let mut edits: Vec<(String, Value)> = DTYPES
            .iter()
            .map(|dtype| (format!("dtype {dtype}"), json!({ "dtype": dtype })))
            .collect();
        let mut reshaped = vec![
            shape[..shape.len() - 1].to_vec(),
            [&shape[..], &[1]].concat(),
            [&shape[..1], &[shape[0] * 2]].concat(),
            shape.iter().rev().copied().collect(),
            [shape[0] + 1].into_iter().chain(shape[1..].iter().copied()).collect(),
        ];
        reshaped.retain(|s| *s != shape);
        edits.extend(
            reshaped
                .into_iter()
                .map(|s| (format!("shape {s:?}"), json!({ "shape": s }))),
        );
        let offsets = [
            (start, end + 4),
            (start + 4, end),
            (end, start),
            (start, total + 64),
            (0, end),
            (start, i128::from(u64::MAX)),
            (-1, end),
            (start, start),
        ];
        edits.extend(
            offsets
                .into_iter()
                .filter(|&o| o != (start, end))
                .map(|(s, e)| (format!("data_offsets [{s}, {e}]"), json!({ "data_offsets": [s, e] }))),
        );
        edits.push(("dtype null".into(), json!({ "dtype": null })));
        edits.push(("shape [-1]".into(), json!({ "shape": [-1] })));
        edits.push(("not an object".into(), json!(7)));
        for (what, edit) in edits {
            let mut header = parts.header.clone();
            match edit.as_object() {
                Some(fields) => {
                    for (key, value) in fields {
                        header[name][key] = value.clone();
                    }
                }
                None => header[name] = edit,
            }
            run.case(
                || format!("{name}: {what}"),
                FILE,
                &assemble(&header, &parts.data),
                Expect::Error,
            );
        }
        let mut header = parts.header.clone();
        header.remove(name);
        run.case(
            || format!("{name}: header entry removed"),
            FILE,
            &assemble(&header, &parts.data),
            Expect::Error,
        );
    }

    // Well-formed files whose tensors are wrong for the model.
    let raw = read_raw(&bytes);
    let mut edited = |name: String, edit: &dyn Fn(&mut Raw), expect: Expect| {
        let mut raw = raw.clone();
        edit(&mut raw);
        run.case(|| name, FILE, &write_raw(&raw), expect);
    };
    for key in raw.keys() {
        // lm_head.weight is optional: the model ties it to the embedding.
        let removed = if key == "lm_head.weight" {
            Expect::ErrorOrSame
        } else {
            Expect::Error
        };
        edited(format!("{key}: removed"), &|raw| drop(raw.remove(key)), removed);
        edited(
            format!("{key}: renamed"),
            &|raw| {
                let entry = raw.remove(key).unwrap();
                raw.insert(format!("{key}_"), entry);
            },
            Expect::Error,
        );
        edited(
            format!("{key}: as I32"),
            &|raw| raw.get_mut(key).unwrap().0 = Dtype::I32,
            Expect::Error,
        );
        edited(
            format!("{key}: as U8"),
            &|raw| {
                let (dtype, shape, _) = raw.get_mut(key).unwrap();
                *dtype = Dtype::U8;
                shape.push(4);
            },
            Expect::Error,
        );
        edited(
            format!("{key}: one row more"),
            &|raw| {
                let (_, shape, data) = raw.get_mut(key).unwrap();
                let row = data.len() / shape[0];
                shape[0] += 1;
                data.extend(std::iter::repeat_n(0, row));
            },
            Expect::Error,
        );
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let at = rng.random_range(0..raw[key].2.len() / 4);
            edited(
                format!("{key}: {bad} at {at}"),
                &|raw| raw.get_mut(key).unwrap().2[4 * at..4 * at + 4].copy_from_slice(&bad.to_le_bytes()),
                Expect::Error,
            );
        }
        edited(
            format!("{key}: f64 beyond f32"),
            &|raw| {
                let (dtype, _, data) = raw.get_mut(key).unwrap();
                *dtype = Dtype::F64;
                *data = data.chunks_exact(4).flat_map(|_| 1e300f64.to_le_bytes()).collect();
            },
            Expect::Error,
        );
    }
    let ln_f = raw["transformer.ln_f.weight"].clone();
    edited(
        "an extra tensor".into(),
        &|raw| drop(raw.insert("transformer.ln_g.weight".into(), ln_f.clone())),
        Expect::Error,
    );
    edited(
        "a stored RoPE table (skipped)".into(),
        &|raw| drop(raw.insert("freqs_cis".into(), ln_f.clone())),
        Expect::ErrorOrSame,
    );

    // Contiguous offsets whose end is near 2^64: each size fits, their sum with the header's
    // length does not.
    let huge = (usize::MAX / 8) as u64;
    let mut header = serde_json::Map::new();
    for i in 0..8u64 {
        header.insert(
            format!("t{i}"),
            json!({"dtype": "U8", "shape": [huge], "data_offsets": [i * huge, (i + 1) * huge]}),
        );
    }
    run.case(
        || "offsets summing past 2^64".into(),
        FILE,
        &assemble(&header, &[]),
        Expect::Error,
    );

    run.finish(5000);
}

#[test]
fn bad_shard_indexes_and_shards_are_one_line_errors() {
    const INDEX: &str = "model.safetensors.index.json";
    let (_dir, mut run) = Run::new(|model, dir| model.export_hf(dir, 8 * 1024).unwrap());
    let index_bytes = run.read(INDEX);
    let index: Value = serde_json::from_slice(&index_bytes).unwrap();
    let weight_map: BTreeMap<String, String> = serde_json::from_value(index["weight_map"].clone()).unwrap();
    let mut shards: Vec<&String> = weight_map.values().collect();
    shards.sort();
    shards.dedup();
    assert!(shards.len() > 3, "{} shards", shards.len());
    let mut rng = ChaCha8Rng::seed_from_u64(15);

    for cut in 0..index_bytes.len() {
        run.case(
            || format!("index cut at {cut}"),
            INDEX,
            &index_bytes[..cut],
            Expect::Error,
        );
    }
    for i in 0..300 {
        let mut noisy = index_bytes.clone();
        let at = rng.random_range(0..noisy.len());
        noisy[at] = rng.random();
        run.case(|| format!("random index byte #{i}"), INDEX, &noisy, Expect::ErrorOrSame);
    }
    for shard in &shards {
        let path = run.path(shard);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        run.check(|| format!("{shard} removed"), Expect::Error);
        std::fs::write(&path, &bytes).unwrap();
        for _ in 0..20 {
            let cut = rng.random_range(0..bytes.len());
            run.case(|| format!("{shard} cut at {cut}"), shard, &bytes[..cut], Expect::Error);
        }
    }

    let with_map = |edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut index = index.clone();
        edit(index["weight_map"].as_object_mut().unwrap());
        serde_json::to_vec(&index).unwrap()
    };
    for (key, shard) in &weight_map {
        let other = shards.iter().find(|s| **s != shard).unwrap().to_string();
        let moved = with_map(&|map| drop(map.insert(key.clone(), other.clone().into())));
        run.case(|| format!("index puts {key} in {other}"), INDEX, &moved, Expect::Error);
        let unlisted = with_map(&|map| drop(map.remove(key)));
        run.case(|| format!("index leaves out {key}"), INDEX, &unlisted, Expect::Error);
        let renamed = with_map(&|map| drop(map.insert(format!("{key}_"), map[key].clone())));
        run.case(|| format!("index lists {key}_ too"), INDEX, &renamed, Expect::Error);
    }
    let elsewhere = tempfile::tempdir().unwrap();
    let first = shards[0].to_string();
    std::fs::copy(run.path(&first), elsewhere.path().join(&first)).unwrap();
    for name in [
        elsewhere.path().join(&first).display().to_string(),
        format!("./{first}"),
        format!("../{}/{first}", run.dir.file_name().unwrap().to_string_lossy()),
        ".".into(),
        "".into(),
        "missing.safetensors".into(),
    ] {
        let renamed = with_map(&|map| {
            for value in map.values_mut() {
                if *value == first.as_str() {
                    *value = name.clone().into();
                }
            }
        });
        run.case(|| format!("shard named {name:?}"), INDEX, &renamed, Expect::Error);
    }
    for (what, weight_map) in [
        ("empty", json!({})),
        ("a list", json!([])),
        ("null", json!(null)),
        ("numbers", json!({"transformer.wte.weight": 1})),
    ] {
        let mut index = index.clone();
        index["weight_map"] = weight_map;
        run.case(
            || format!("weight_map {what}"),
            INDEX,
            &serde_json::to_vec(&index).unwrap(),
            Expect::Error,
        );
    }

    // A tensor in two shards, with different values.
    let wte_shard = weight_map["transformer.wte.weight"].clone();
    let other = shards.iter().find(|s| **s != &wte_shard).unwrap().to_string();
    let mut raw = read_raw(&run.read(&other));
    let mut copy = read_raw(&run.read(&wte_shard))["transformer.wte.weight"].clone();
    copy.2.iter_mut().for_each(|b| *b = 0);
    raw.insert("transformer.wte.weight".into(), copy);
    run.case(
        || format!("wte also in {other}"),
        &other,
        &write_raw(&raw),
        Expect::Error,
    );

    run.finish(2500);
}

#[test]
fn bad_burn_records_are_one_line_errors() {
    const FILE: &str = "model.bpk";
    let (_dir, mut run) = Run::new(|model, dir| model.save_burn(dir).unwrap());
    let bytes = run.read(FILE);
    // Burnpack: magic (4), version (2), metadata length (4), CBOR metadata, data from the next
    // multiple of 256.
    let metadata_end = 10 + u32::from_le_bytes(bytes[6..10].try_into().unwrap()) as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(15);

    for cut in 0..=metadata_end {
        run.case(|| format!("cut at {cut}"), FILE, &bytes[..cut], Expect::Error);
    }
    // Past the metadata a cut may fall in the padding after the last tensor.
    let data_start = metadata_end.next_multiple_of(256);
    let mut cuts: Vec<usize> = (data_start..bytes.len()).step_by(256).collect();
    cuts.extend((0..200).map(|_| rng.random_range(metadata_end..bytes.len())));
    for cut in cuts {
        run.case(|| format!("cut at {cut}"), FILE, &bytes[..cut], Expect::ErrorOrSame);
    }
    for i in 0..1000 {
        let mut noisy = bytes.clone();
        noisy[rng.random_range(0..metadata_end)] = rng.random();
        run.case(|| format!("random metadata byte #{i}"), FILE, &noisy, Expect::NoPanic);
    }
    for i in 0..300 {
        let mut bad = bytes.clone();
        let at = data_start + 4 * rng.random_range(0..(bytes.len() - data_start) / 4);
        bad[at..at + 4].copy_from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3].to_le_bytes());
        // Padding between tensors may take the value unread.
        run.case(|| format!("non-finite at byte {at}"), FILE, &bad, Expect::ErrorOrSame);
    }
    run.finish(2000);
}

/// A quantized folder (8 and 4 bits) with its levels, scales, header and config damaged: any
/// level or scale byte may change (a level still in range is another valid model), but never to
/// a panic or a message of more than one line; cut or lying files and configs are errors.
#[test]
fn bad_quantized_folders_are_one_line_errors() {
    const FILE: &str = "model.safetensors";
    for (bits, seed) in [(model::Bits::Eight, 21), (model::Bits::Four, 22)] {
        let model = tiny().init(&Device::flex(), 7).quantize(bits);
        let (_dir, mut run) = Run::of(model, |model, dir| model.export_hf(dir, usize::MAX).unwrap());
        let bytes = run.read(FILE);
        let parts = Parts::of(&bytes);
        let data_start = 8 + parts.header_len;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (name, start, end) in parts.tensors() {
            if !name.ends_with(".qweight") && !name.ends_with(".qscales") {
                continue;
            }
            // Cut at the tensor's ends.
            for cut in [data_start + start + 1, data_start + end - 1] {
                run.case(
                    || format!("{bits:?}: cut in {name} at {cut}"),
                    FILE,
                    &bytes[..cut],
                    Expect::Error,
                );
            }
            // Random bytes inside it.
            for i in 0..40 {
                let mut noisy = bytes.clone();
                for _ in 0..rng.random_range(1..=4) {
                    noisy[data_start + rng.random_range(start..end)] = rng.random();
                }
                run.case(
                    || format!("{bits:?}: random bytes in {name} #{i}"),
                    FILE,
                    &noisy,
                    Expect::NoPanic,
                );
            }
            // A scale of every special kind, and a level out of range.
            if name.ends_with(".qscales") {
                for bad in [half::f16::NAN, half::f16::INFINITY, half::f16::from_f32(-1.0)] {
                    let mut broken = bytes.clone();
                    broken[data_start + start..data_start + start + 2].copy_from_slice(&bad.to_le_bytes());
                    run.case(
                        || format!("{bits:?}: scale {bad} in {name}"),
                        FILE,
                        &broken,
                        Expect::Error,
                    );
                }
            } else {
                let mut broken = bytes.clone();
                // -128 for 8 bits; nibble 0 (level -8) for 4 bits.
                broken[data_start + start] = if bits == model::Bits::Eight { 0x80 } else { 0x00 };
                run.case(
                    || format!("{bits:?}: level out of range in {name}"),
                    FILE,
                    &broken,
                    Expect::Error,
                );
            }
        }
        // Random bytes in the header.
        for i in 0..300 {
            let mut noisy = bytes.clone();
            for _ in 0..rng.random_range(1..=3) {
                noisy[rng.random_range(0..data_start)] = rng.random();
            }
            run.case(
                || format!("{bits:?}: random header bytes #{i}"),
                FILE,
                &noisy,
                Expect::ErrorOrSame,
            );
        }
        // The config's scheme damaged.
        let config: Value = serde_json::from_slice(&run.read("config.json")).unwrap();
        let edits = [
            json!({"bits": 2, "group_size": 32, "scale_dtype": "f16"}),
            json!({"bits": "8", "group_size": 32, "scale_dtype": "f16"}),
            json!({"bits": 8, "group_size": 0, "scale_dtype": "f16"}),
            json!({"bits": 8, "group_size": 32, "scale_dtype": "bf16"}),
            json!({"bits": 8, "group_size": 32}),
            json!({"bits": 8, "group_size": 32, "scale_dtype": "f16", "zero_point": true}),
            json!(null),
            json!(8),
        ];
        for edit in edits {
            let mut broken = config.clone();
            broken["quantization"] = edit.clone();
            let text = serde_json::to_vec(&broken).unwrap();
            run.case(
                || format!("{bits:?}: quantization = {edit}"),
                "config.json",
                &text,
                Expect::Error,
            );
        }
        run.finish(400);
    }
}
