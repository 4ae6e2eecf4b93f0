//! Hugging Face checkpoints: reading (single `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`) and writing (the reference key names, so a model trained
//! here loads in the authors' code).
//!
//! Files are memory-mapped and each tensor is converted on its own, so loading needs the
//! model's size in memory plus one tensor, not twice the checkpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use memmap2::Mmap;
use safetensors::View;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use crate::error::WeightsError;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// An open checkpoint. Tensors are taken by key; [`Checkpoint::finish`] reports keys nobody took.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// key → shard
    keys: BTreeMap<String, usize>,
    taken: BTreeSet<String>,
}

/// Where to transpose a 2-D tensor on load: PyTorch linears are `[out, in]`, Burn's `[in, out]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    AsStored,
    Transposed,
}

impl Checkpoint {
    /// Opens a `.safetensors` file, or a folder holding `model.safetensors` or a shard index.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, WeightsError> {
        let path = path.as_ref();
        let index = path.join(INDEX_FILE);
        let single = path.join(SINGLE_FILE);
        let (files, weight_map) = if !path.is_dir() {
            (vec![path.to_path_buf()], None)
        } else if index.exists() {
            let weight_map = read_index(&index)?;
            let names: BTreeSet<&String> = weight_map.values().collect();
            (
                names.into_iter().map(|name| path.join(name)).collect(),
                Some(weight_map),
            )
        } else if single.exists() {
            (vec![single], None)
        } else {
            return Err(WeightsError::NoWeights {
                path: path.to_path_buf(),
            });
        };
        let mut shards = Vec::new();
        let mut keys = BTreeMap::new();
        for file in files {
            let shard = Shard::open(&file)?;
            for key in shard.metadata.tensors().into_keys() {
                keys.insert(key, shards.len());
            }
            shards.push(shard);
        }
        if let Some(weight_map) = weight_map {
            check_index(&index, &weight_map, &shards)?;
        }
        Ok(Self {
            shards,
            keys,
            taken: BTreeSet::new(),
        })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// The file a key lives in (or the first file, for a key that is absent).
    pub fn path_of(&self, key: &str) -> &Path {
        let shard = self.keys.get(key).copied().unwrap_or(0);
        &self.shards[shard].path
    }

    /// Where `key` is stored, checked to have the `expected` shape (`dims` names the config
    /// fields it comes from).
    fn stored(&self, key: &str, expected: &[usize], dims: &'static str) -> Result<(&Shard, &TensorInfo), WeightsError> {
        let Some(&shard) = self.keys.get(key) else {
            return Err(WeightsError::MissingKey {
                path: self.path_of(key).to_path_buf(),
                key: key.into(),
            });
        };
        let shard = &self.shards[shard];
        let info = shard.metadata.info(key).expect("indexed key");
        if info.shape != expected {
            return Err(WeightsError::Shape {
                path: shard.path.clone(),
                key: key.into(),
                expected: expected.to_vec(),
                dims,
                found: info.shape.clone(),
            });
        }
        Ok((shard, info))
    }

    /// Reads `key` as f32 on the host, checking its shape against `expected` (given in the
    /// stored layout; `dims` names the config fields it comes from) and that every value is finite.
    pub fn read(
        &mut self,
        key: &str,
        expected: &[usize],
        dims: &'static str,
        layout: Layout,
    ) -> Result<TensorData, WeightsError> {
        let (shard, info) = self.stored(key, expected, dims)?;
        let path = || shard.path.clone();
        let mut values = to_f32(shard.bytes(info), info.dtype).ok_or_else(|| WeightsError::Dtype {
            path: path(),
            key: key.into(),
            dtype: format!("{:?}", info.dtype),
        })?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(WeightsError::NonFinite {
                path: path(),
                key: key.into(),
            });
        }
        let mut shape = expected.to_vec();
        if layout == Layout::Transposed {
            let [rows, cols] = [expected[0], expected[1]];
            values = transpose(&values, rows, cols);
            shape = vec![cols, rows];
        }
        self.taken.insert(key.to_string());
        Ok(TensorData::new(values, shape))
    }

    /// The stored bytes of `key`, checked to be of `dtype` and `expected` shape (little-endian,
    /// as safetensors stores them): quantized levels and scales, which are not converted to f32.
    pub fn raw(
        &mut self,
        key: &str,
        expected: &[usize],
        dims: &'static str,
        dtype: Dtype,
    ) -> Result<Vec<u8>, WeightsError> {
        let (shard, info) = self.stored(key, expected, dims)?;
        if info.dtype != dtype {
            return Err(WeightsError::Quantized {
                path: shard.path.clone(),
                key: key.into(),
                reason: format!("stored as {:?}, the config's scheme stores {dtype:?}", info.dtype),
            });
        }
        let bytes = shard.bytes(info).to_vec();
        self.taken.insert(key.to_string());
        Ok(bytes)
    }

    /// Reads `key` onto `device` in the device's float type.
    pub fn tensor<const D: usize>(
        &mut self,
        key: &str,
        expected: [usize; D],
        dims: &'static str,
        layout: Layout,
        device: &Device,
    ) -> Result<Tensor<D>, WeightsError> {
        Ok(Tensor::from_data(self.read(key, &expected, dims, layout)?, device))
    }

    /// Marks a key as deliberately ignored (e.g. the stored RoPE table).
    pub fn skip(&mut self, key: &str) {
        if self.keys.contains_key(key) {
            self.taken.insert(key.to_string());
        }
    }

    /// Fails on the first stored key that was neither taken nor skipped.
    pub fn finish(self) -> Result<(), WeightsError> {
        match self.keys.keys().find(|k| !self.taken.contains(*k)) {
            Some(key) => Err(WeightsError::UnexpectedKey {
                path: self.path_of(key).to_path_buf(),
                key: key.clone(),
            }),
            None => Ok(()),
        }
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Self, WeightsError> {
        let io = |error| WeightsError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file truncated by another process while mapped can
        // fault, as with any mmap-based loader (the HF and burn-store loaders alike).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (header_len, metadata) = read_header(&map).map_err(|reason| WeightsError::Corrupt {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header_len,
            metadata,
        })
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = 8 + self.header_len;
        &self.map[start + info.data_offsets.0..start + info.data_offsets.1]
    }
}

/// The header of a safetensors file: its length and the tensors' metadata, checked against the
/// file's length.
///
/// What `SafeTensors::read_metadata` checks, in an order that cannot overflow: safetensors 0.8
/// adds the data length a header claims to the header's own without checking, so a header whose
/// offsets reach near 2^64 panics there in a debug build.
fn read_header(bytes: &[u8]) -> Result<(usize, Metadata), String> {
    let Some((prefix, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(format!("{} bytes, too short for the header length", bytes.len()));
    };
    let claimed = u64::from_le_bytes(*prefix);
    let Some(header) = usize::try_from(claimed).ok().and_then(|n| rest.get(..n)) else {
        return Err(format!(
            "the header length is {claimed} bytes, but only {} follow it",
            rest.len()
        ));
    };
    let metadata: Metadata = serde_json::from_slice(header).map_err(|e| format!("invalid header: {e}"))?;
    let data = rest.len() - header.len();
    let end = metadata
        .tensors()
        .values()
        .map(|info| info.data_offsets.1)
        .max()
        .unwrap_or(0);
    if end != data {
        return Err(format!(
            "the header's tensors take {end} bytes, but {data} follow the header"
        ));
    }
    Ok((header.len(), metadata))
}

/// The `weight_map` of a shard index: tensor name → shard file name in the index's folder.
/// Public so that a download fetches exactly the shards the loader will read.
pub fn read_index(index: &Path) -> Result<BTreeMap<String, String>, WeightsError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let invalid = |reason: String| WeightsError::Index {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|error| WeightsError::Io {
        path: index.to_path_buf(),
        error,
    })?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if parsed.weight_map.is_empty() {
        return Err(invalid("empty weight_map".into()));
    }
    // A name with a directory part would read a file outside the model folder.
    if let Some(name) = parsed
        .weight_map
        .values()
        .find(|name| Path::new(name).file_name() != Some(OsStr::new(name)))
    {
        return Err(invalid(format!("shard {name:?} is not a file name")));
    }
    Ok(parsed.weight_map)
}

/// Fails unless each shard holds exactly the tensors `weight_map` puts in it, which also keeps a
/// tensor from being in two shards.
fn check_index(index: &Path, weight_map: &BTreeMap<String, String>, shards: &[Shard]) -> Result<(), WeightsError> {
    let invalid = |reason: String| WeightsError::Index {
        path: index.to_path_buf(),
        reason,
    };
    let name = |shard: &Shard| {
        shard
            .path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    for shard in shards {
        let stored: BTreeSet<String> = shard.metadata.tensors().into_keys().collect();
        for key in stored {
            match weight_map.get(&key) {
                Some(file) if *file == name(shard) => {}
                Some(file) => {
                    return Err(invalid(format!(
                        "{key:?} is in {}, but weight_map puts it in {file}",
                        name(shard)
                    )));
                }
                None => return Err(invalid(format!("{key:?} is in {}, but not in weight_map", name(shard)))),
            }
        }
    }
    for (key, file) in weight_map {
        let held = shards
            .iter()
            .any(|shard| name(shard) == *file && shard.metadata.info(key).is_some());
        if !held {
            return Err(invalid(format!(
                "weight_map puts {key:?} in {file}, which does not hold it"
            )));
        }
    }
    Ok(())
}

fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    let words = |n: usize| bytes.chunks_exact(n);
    Some(match dtype {
        Dtype::F32 => words(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        Dtype::F64 => words(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        Dtype::F16 => words(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => words(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    // Blocked so large matrices stay cache friendly.
    const BLOCK: usize = 64;
    for r0 in (0..rows).step_by(BLOCK) {
        for c0 in (0..cols).step_by(BLOCK) {
            for r in r0..(r0 + BLOCK).min(rows) {
                for c in c0..(c0 + BLOCK).min(cols) {
                    out[c * rows + r] = values[r * cols + c];
                }
            }
        }
    }
    out
}

/// One tensor to write: host data in the stored layout (f32 for float weights).
pub struct Entry {
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    pub dtype: Dtype,
}

impl Entry {
    /// From a device tensor, transposing 2-D data when `layout` says so.
    pub fn from_tensor<const D: usize>(tensor: Tensor<D>, layout: Layout) -> Self {
        let tensor = match tensor.dtype() {
            burn::tensor::DType::QFloat(_) => tensor.dequantize(),
            _ => tensor,
        };
        let tensor = if layout == Layout::Transposed {
            tensor.transpose()
        } else {
            tensor
        };
        let shape = tensor.dims().to_vec();
        let values: Vec<f32> = tensor
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 after convert");
        Self {
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            dtype: Dtype::F32,
        }
    }
}

impl View for &Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `entries` as safetensors into `dir`: one `model.safetensors`, or shards of at
/// most `max_shard_bytes` with a `model.safetensors.index.json` as Hugging Face writes them.
pub fn write(dir: &Path, entries: &BTreeMap<String, Entry>, max_shard_bytes: usize) -> Result<(), WeightsError> {
    let write_err = |path: &Path, reason: String| WeightsError::Write {
        path: path.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e.to_string()))?;
    let mut shards: Vec<Vec<&String>> = vec![vec![]];
    let mut size = 0;
    for (key, entry) in entries {
        if size > 0 && size + entry.bytes.len() > max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        size += entry.bytes.len();
        shards.last_mut().unwrap().push(key);
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, keys) in shards.iter().enumerate() {
        let name = if count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        };
        let path = dir.join(&name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let views = keys.iter().map(|k| (k.as_str(), &entries[*k]));
        safetensors::serialize_to_file(views, metadata.clone(), &tmp).map_err(|e| write_err(&tmp, e.to_string()))?;
        std::fs::rename(&tmp, &path).map_err(|e| write_err(&path, e.to_string()))?;
        for key in keys {
            weight_map.insert((*key).clone(), name.clone());
        }
    }
    if count > 1 {
        let total: usize = entries.values().map(|e| e.bytes.len()).sum();
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&index).unwrap())
            .map_err(|e| write_err(&path, e.to_string()))?;
    }
    Ok(())
}
