//! Fine-tuning: a run whose `init_from` names a model folder (or a hub name) starts from its
//! weights, with the shape its `config.json` gives and a fresh optimizer, and its `final/`
//! carries the folder's text files (tokenizer config with the chat template, generation config)
//! so that every command opens it as it opened the original.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use folder::{CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE};
use model::pretrained::CONFIG_FILE;
use model::{Huginn, HuginnConfig};

use crate::run::{RunConfig, TrainError};

/// `spec` as a folder here: itself, or a hub name's snapshot in the Hugging Face cache.
pub fn resolve(spec: &Path) -> Result<PathBuf, TrainError> {
    folder::hub::resolve(spec).map_err(|e| TrainError::InvalidConfig(format!("init_from: {e}")))
}

/// The config of the model folder `dir`.
pub fn folder_config(dir: &Path) -> Result<HuginnConfig, TrainError> {
    HuginnConfig::from_file(dir.join(CONFIG_FILE)).map_err(|e| TrainError::InvalidConfig(format!("init_from: {e}")))
}

/// The fields of `run`'s model config that differ from `folder`'s, leaving out the training
/// depth (`mean_recurrence`, `mean_backprop_depth`), which a fine-tuning run may choose.
pub fn shape_differences(run: &HuginnConfig, folder: &HuginnConfig) -> Vec<String> {
    let as_map = |c: &HuginnConfig| match serde_json::to_value(c) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => unreachable!("a config serializes to an object"),
    };
    let (run, folder) = (as_map(run), as_map(folder));
    let mut keys: Vec<&String> = run.keys().chain(folder.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !["mean_recurrence", "mean_backprop_depth"].contains(&k.as_str()))
        .filter(|k| run.get(*k) != folder.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("nothing".to_string(), |v| v.to_string());
            format!("{k} = {} (the model has {})", show(run.get(k)), show(folder.get(k)))
        })
        .collect()
}

impl RunConfig {
    /// The weights the run starts from: `init_from`'s, else fresh ones from the seed.
    pub fn initial_model(&self, device: &Device) -> Result<Huginn, TrainError> {
        let Some(spec) = &self.init_from else {
            return Ok(self.model.init(device, self.seed));
        };
        let dir = resolve(spec)?;
        let folder = folder_config(&dir)?;
        if let Some(quantization) = &folder.quantization {
            return Err(TrainError::InvalidConfig(format!(
                "init_from {}: the folder holds {}-bit weights, which cannot be trained (no gradient \
                 flows through the rounding); start from the float folder it was quantized from",
                spec.display(),
                quantization.bits.count()
            )));
        }
        let differences = shape_differences(&self.model, &folder);
        if !differences.is_empty() {
            return Err(TrainError::InvalidConfig(format!(
                "the model section contradicts {}'s config: {}",
                spec.display(),
                differences.join(", ")
            )));
        }
        let mut model = Huginn::from_pretrained(&dir, device)
            .map_err(|e| TrainError::InvalidConfig(format!("init_from {}: {e}", spec.display())))?;
        // The folder's shape with the training depth this run records.
        model.config = self.model.clone();
        Ok(model)
    }

    /// Copies `init_from`'s tokenizer config, chat template and generation config into the
    /// final folder `dir` (over the generic tokenizer config a text run writes).
    pub fn copy_init_text_files(&self, dir: &Path) -> Result<(), TrainError> {
        let Some(spec) = &self.init_from else {
            return Ok(());
        };
        let from = resolve(spec)?;
        for file in [TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE] {
            let source = from.join(file);
            if source.exists() {
                std::fs::copy(&source, dir.join(file)).map_err(|e| TrainError::Io {
                    path: source.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        Ok(())
    }
}
