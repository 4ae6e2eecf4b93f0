//! Safetensors files of f32 and u32 arrays: how captures and PCA bases are stored, so that
//! they open as plain arrays elsewhere too (`safetensors.numpy.load_file` in Python).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::AnalysisError;

/// The values of one stored array.
pub enum Values<'a> {
    F32(&'a [f32]),
    U32(&'a [u32]),
}

/// Writes `(name, shape, values)` arrays and string `metadata` to `path` (its directory
/// created if needed).
pub fn write(
    path: &Path,
    arrays: &[(&str, Vec<usize>, Values)],
    metadata: HashMap<String, String>,
) -> Result<(), AnalysisError> {
    let bytes: Vec<(Dtype, Vec<u8>)> = arrays
        .iter()
        .map(|(_, _, values)| match values {
            Values::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Values::U32(v) => (Dtype::U32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    let mut views = Vec::with_capacity(arrays.len());
    for ((name, shape, _), (dtype, data)) in arrays.iter().zip(&bytes) {
        let view = TensorView::new(*dtype, shape.clone(), data)
            .map_err(|e| AnalysisError::Invalid(format!("array `{name}`: {e}")))?;
        views.push((name.to_string(), view));
    }
    let metadata = (!metadata.is_empty()).then_some(metadata);
    create_parent(path)?;
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| AnalysisError::format(path, e))
}

/// Creates the directory `path` will be written in, if it is missing.
pub fn create_parent(path: &Path) -> Result<(), AnalysisError> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir).map_err(AnalysisError::io(dir)),
        None => Ok(()),
    }
}

/// A safetensors file read into memory.
pub struct Stored {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Stored {
    pub fn open(path: &Path) -> Result<Self, AnalysisError> {
        let bytes = std::fs::read(path).map_err(AnalysisError::io(path))?;
        let stored = Self {
            path: path.to_path_buf(),
            bytes,
        };
        stored.tensors()?;
        Ok(stored)
    }

    fn tensors(&self) -> Result<SafeTensors<'_>, AnalysisError> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| AnalysisError::format(&self.path, e))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors().is_ok_and(|t| t.names().contains(&name))
    }

    /// The string metadata of the header.
    pub fn metadata(&self) -> Result<HashMap<String, String>, AnalysisError> {
        let (_, metadata) =
            SafeTensors::read_metadata(&self.bytes).map_err(|e| AnalysisError::format(&self.path, e))?;
        Ok(metadata.metadata().clone().unwrap_or_default())
    }

    /// An f32 array with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), AnalysisError> {
        let (shape, bytes) = self.raw(name, Dtype::F32)?;
        Ok((
            shape,
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ))
    }

    /// A u32 array with its shape.
    pub fn u32(&self, name: &str) -> Result<(Vec<usize>, Vec<u32>), AnalysisError> {
        let (shape, bytes) = self.raw(name, Dtype::U32)?;
        Ok((
            shape,
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ))
    }

    fn raw(&self, name: &str, dtype: Dtype) -> Result<(Vec<usize>, &[u8]), AnalysisError> {
        let tensors = self.tensors()?;
        let view = tensors
            .tensor(name)
            .map_err(|_| AnalysisError::format(&self.path, format!("no array `{name}`")))?;
        if view.dtype() != dtype {
            return Err(AnalysisError::format(
                &self.path,
                format!("array `{name}` is {:?}, expected {dtype:?}", view.dtype()),
            ));
        }
        Ok((view.shape().to_vec(), view.data()))
    }

    /// An f32 array that must have exactly `shape`.
    pub fn f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, AnalysisError> {
        let (found, values) = self.f32(name)?;
        if found != shape {
            return Err(AnalysisError::format(
                &self.path,
                format!("array `{name}` has shape {found:?}, expected {shape:?}"),
            ));
        }
        Ok(values)
    }

    /// A u32 array that must have exactly `shape`.
    pub fn u32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<u32>, AnalysisError> {
        let (found, values) = self.u32(name)?;
        if found != shape {
            return Err(AnalysisError::format(
                &self.path,
                format!("array `{name}` has shape {found:?}, expected {shape:?}"),
            ));
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_arrays_and_metadata_and_names_what_is_wrong() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let path = dir.join("a.safetensors");
        let floats = [1.5f32, -2.0, 3.25, 0.0, 7.0, 8.0];
        let ints = [4u32, 5, 6];
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        write(
            &path,
            &[
                ("x", vec![2, 3], Values::F32(&floats)),
                ("t", vec![3], Values::U32(&ints)),
            ],
            meta.clone(),
        )
        .unwrap();
        let stored = Stored::open(&path).unwrap();
        assert_eq!(stored.f32("x").unwrap(), (vec![2, 3], floats.to_vec()));
        assert_eq!(stored.u32_shaped("t", &[3]).unwrap(), ints.to_vec());
        assert_eq!(stored.metadata().unwrap(), meta);
        assert!(stored.contains("x") && !stored.contains("y"));
        let err = stored.f32("y").unwrap_err().to_string();
        assert!(err.ends_with("a.safetensors: no array `y`"), "{err}");
        let err = stored.f32("t").unwrap_err().to_string();
        assert!(err.contains("array `t` is U32, expected F32"), "{err}");
        let err = stored.f32_shaped("x", &[3, 2]).unwrap_err().to_string();
        assert!(err.contains("shape [2, 3], expected [3, 2]"), "{err}");
        std::fs::write(&path, b"not safetensors").unwrap();
        assert!(matches!(Stored::open(&path), Err(AnalysisError::Format { .. })));
    }
}
