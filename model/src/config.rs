//! The model configuration, read from the reference `config.json` as `save_pretrained` writes it.
//!
//! Every field of the reference `RavenConfig` is here with the reference default, so a
//! `config.json` that omits fields reads the same way the authors' code reads it, except for
//! [`REQUIRED`]: the fields that fix the weights' shapes, which the reference would default to
//! Huginn-0125's. Unknown extra fields are tolerated (Hugging Face adds its own). Derived fields
//! that the reference writes (`head_dim`, `init_values`, ...) are read too, and
//! [`HuginnConfig::validate`] checks that they agree with the fields they derive from.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::quantize::Quantization;

/// Fields `config.json` must have. Each fixes the weights' shapes, and the reference's default
/// for it is Huginn-0125's, so a file that lost one would otherwise fail later as a shape
/// mismatch on some tensor instead of naming the field.
pub const REQUIRED: [&str; 7] = [
    "n_embd",
    "n_heads",
    "vocab_size",
    "intermediate_size",
    "n_layers_in_prelude",
    "n_layers_in_recurrent_block",
    "n_layers_in_coda",
];

/// The longest context a model may declare: rotary positions are computed in f32, which holds
/// every integer only up to 2^24 (no table or position embedding grows with `block_size`, so
/// the weights set no other bound).
pub const MAX_BLOCK_SIZE: usize = 1 << 24;

/// The architecture hyper-parameters of a recurrent-depth model (reference `RavenConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HuginnConfig {
    /// Hidden width `h`.
    pub n_embd: usize,
    /// Attention heads (plain multi-head attention: as many key/value heads).
    pub n_heads: usize,
    /// Informational total of the layers in prelude, core and coda.
    pub n_layers: usize,
    /// Context length: the RoPE table length and the longest sequence the model accepts.
    pub block_size: usize,
    pub vocab_size: usize,
    pub padding_multiple: usize,
    pub tie_embeddings: bool,
    pub intermediate_size: usize,
    pub bias: bool,
    pub architecture_class_name: String,
    pub block_class_name: String,
    pub norm_class_name: String,
    pub norm_eps: f64,
    pub mlp_class_name: String,
    pub nonlin_name: String,
    pub init_strategy: String,
    pub init_orthogonal: bool,
    pub state_init: String,
    pub injection_type: String,
    /// Layers in the recurrent core, applied once per recurrence step.
    pub n_layers_in_recurrent_block: usize,
    /// Mean recurrence `r̄`: the depth used when a caller does not choose one.
    pub mean_recurrence: usize,
    pub sampling_scheme: String,
    /// Truncated-backprop depth `k`.
    pub mean_backprop_depth: usize,
    pub n_layers_in_prelude: usize,
    pub n_layers_in_coda: usize,
    pub qk_bias: bool,
    pub activation_checkpoint_impl: String,
    pub rope_base: f64,
    pub test_time_noise: f64,
    pub test_time_noise_type: String,
    pub model_type: String,
    // Derived fields the reference writes; `None` when absent, checked when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub padded_vocab_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective_expected_depth: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_values: Option<InitValues>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_map: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transformers_version: Option<String>,
    /// How the linear weights are stored, in a folder written by `huginn quantize`; absent for
    /// float weights (and in the reference's configs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
}

/// Initialisation constants the reference derives from the width and the unrolled depth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitValues {
    pub std: f64,
    pub out_proj: f64,
    pub embedding: f64,
    pub embed_scale: f64,
}

impl Default for HuginnConfig {
    /// The released Huginn-0125 configuration (which is also the reference default).
    fn default() -> Self {
        Self {
            n_embd: 5280,
            n_heads: 55,
            n_layers: 8,
            block_size: 4096,
            vocab_size: 65536,
            padding_multiple: 4096,
            tie_embeddings: true,
            intermediate_size: 17920,
            bias: false,
            architecture_class_name: "RecurrentGPT".into(),
            block_class_name: "SandwichBlock".into(),
            norm_class_name: "RMSNorm_llama".into(),
            norm_eps: 1e-6,
            mlp_class_name: "GatedMLP".into(),
            nonlin_name: "SiLU".into(),
            init_strategy: "takase".into(),
            init_orthogonal: false,
            state_init: "like-init".into(),
            injection_type: "linear".into(),
            n_layers_in_recurrent_block: 4,
            mean_recurrence: 32,
            sampling_scheme: "poisson-lognormal-filling".into(),
            mean_backprop_depth: 8,
            n_layers_in_prelude: 2,
            n_layers_in_coda: 2,
            qk_bias: true,
            activation_checkpoint_impl: "per-iteration".into(),
            rope_base: 50000.0,
            test_time_noise: 0.0,
            test_time_noise_type: "fixed".into(),
            model_type: "huginn_raven".into(),
            head_dim: None,
            num_key_value_heads: None,
            padded_vocab_size: None,
            effective_expected_depth: None,
            init_values: None,
            torch_dtype: None,
            architectures: None,
            auto_map: None,
            transformers_version: None,
            quantization: None,
        }
    }
}

impl HuginnConfig {
    /// A small configuration of the given shape; all other fields keep the reference defaults.
    pub fn tiny(vocab_size: usize, n_embd: usize, n_heads: usize, layers: (usize, usize, usize)) -> Self {
        Self {
            vocab_size,
            n_embd,
            n_heads,
            n_layers_in_prelude: layers.0,
            n_layers_in_recurrent_block: layers.1,
            n_layers_in_coda: layers.2,
            n_layers: layers.0 + layers.1 + layers.2,
            intermediate_size: n_embd * 11 / 4,
            block_size: 256,
            mean_recurrence: 4,
            mean_backprop_depth: 2,
            ..Self::default()
        }
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let fields = value
            .as_object()
            .ok_or_else(|| ConfigError::Parse("not a JSON object".into()))?;
        if let Some(field) = REQUIRED.into_iter().find(|field| !fields.contains_key(*field)) {
            return Err(ConfigError::Missing(field));
        }
        let config = Self::deserialize(&value).map_err(|e| {
            // serde_json's message does not say which field it is about: find the one that fails
            // on its own (the others take their defaults).
            let alone = |(key, value): (&String, &serde_json::Value)| {
                let one = serde_json::Value::Object([(key.clone(), value.clone())].into_iter().collect());
                Self::deserialize(&one).err().map(|e| ConfigError::Field {
                    field: key.clone(),
                    reason: e.to_string(),
                })
            };
            fields
                .iter()
                .find_map(alone)
                .unwrap_or_else(|| ConfigError::Parse(e.to_string()))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Writes the configuration the way the reference writes it, derived fields included, so
    /// that the authors' `RavenConfig.from_pretrained` reads it back.
    pub fn to_json(&self) -> String {
        let mut full = self.clone();
        full.head_dim = Some(self.head_dim());
        full.num_key_value_heads = Some(self.n_heads);
        full.padded_vocab_size = Some(self.vocab_size);
        full.effective_expected_depth = Some(self.effective_expected_depth());
        full.init_values = Some(self.init_values());
        full.n_layers = self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda;
        if full.architectures.is_none() {
            full.architectures = Some(vec!["RavenForCausalLM".into()]);
        }
        if full.auto_map.is_none() {
            full.auto_map = Some(BTreeMap::from([
                ("AutoConfig".into(), "raven_config_minimal.RavenConfig".into()),
                (
                    "AutoModelForCausalLM".into(),
                    "raven_modeling_minimal.RavenForCausalLM".into(),
                ),
            ]));
        }
        serde_json::to_string_pretty(&full).expect("config serialises")
    }

    /// Checks that the configuration describes a model this crate can build exactly. Each
    /// message names the fields it is about.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        let counts = [
            ("n_embd", self.n_embd),
            ("n_heads", self.n_heads),
            ("vocab_size", self.vocab_size),
            ("intermediate_size", self.intermediate_size),
            ("block_size", self.block_size),
            ("n_layers_in_recurrent_block", self.n_layers_in_recurrent_block),
        ];
        if let Some((field, _)) = counts.iter().find(|(_, value)| *value == 0) {
            return bad(format!("{field} = 0; it must be at least 1"));
        }
        if self.block_size > MAX_BLOCK_SIZE {
            return bad(format!(
                "block_size = {} is over {MAX_BLOCK_SIZE}: rotary positions are computed in f32, exact only up to 2^24",
                self.block_size
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_heads) {
            return bad(format!(
                "n_heads = {} does not divide n_embd = {}",
                self.n_heads, self.n_embd
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim = n_embd / n_heads = {} / {} = {} is odd; rotary embeddings rotate pairs",
                self.n_embd,
                self.n_heads,
                self.head_dim()
            ));
        }
        if self.checked_num_params().is_none() || self.checked_effective_expected_depth().is_none() {
            return bad(format!(
                "n_embd = {}, intermediate_size = {}, vocab_size = {}, layers {} + {} + {} and \
                 mean_recurrence = {} give sizes beyond what this machine can address",
                self.n_embd,
                self.intermediate_size,
                self.vocab_size,
                self.n_layers_in_prelude,
                self.n_layers_in_recurrent_block,
                self.n_layers_in_coda,
                self.mean_recurrence
            ));
        }
        for (field, value) in [("norm_eps", self.norm_eps), ("rope_base", self.rope_base)] {
            if !(value.is_finite() && value > 0.0) {
                return bad(format!("{field} = {value} must be positive"));
            }
        }
        let supported = [
            ("block_class_name", self.block_class_name.as_str(), "SandwichBlock"),
            ("norm_class_name", self.norm_class_name.as_str(), "RMSNorm_llama"),
            ("mlp_class_name", self.mlp_class_name.as_str(), "GatedMLP"),
            ("nonlin_name", self.nonlin_name.as_str(), "SiLU"),
            ("injection_type", self.injection_type.as_str(), "linear"),
        ];
        for (field, value, want) in supported {
            if value != want {
                return bad(format!("{field} = {value:?} is not supported (only {want:?})"));
            }
        }
        if self.bias {
            return bad("bias = true is not supported (the reference linears have no bias)".into());
        }
        if !self.tie_embeddings {
            return bad("tie_embeddings = false is not supported".into());
        }
        if !self.qk_bias {
            return bad("qk_bias = false is not supported".into());
        }
        if self.test_time_noise != 0.0 {
            return bad("test_time_noise is not supported (the reference leaves it at 0)".into());
        }
        if let Some(quantization) = &self.quantization {
            quantization.validate()?;
        }
        let derived = [
            (
                "head_dim",
                self.head_dim,
                self.head_dim(),
                format!("n_embd / n_heads = {} / {}", self.n_embd, self.n_heads),
            ),
            (
                "num_key_value_heads",
                self.num_key_value_heads,
                self.n_heads,
                "n_heads".into(),
            ),
            (
                "padded_vocab_size",
                self.padded_vocab_size,
                self.vocab_size,
                "vocab_size".into(),
            ),
        ];
        for (field, stored, want, from) in derived {
            if let Some(stored) = stored
                && stored != want
            {
                return bad(format!("{field} = {stored} disagrees with {from} = {want}"));
            }
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_heads
    }

    /// Unrolled depth at the mean recurrence, `l_P + l_C + l_R·r̄`; it sets the init scale of
    /// the output projections.
    pub fn effective_expected_depth(&self) -> usize {
        self.checked_effective_expected_depth()
            .expect("the unrolled depth overflows usize (validate rejects such a config)")
    }

    fn checked_effective_expected_depth(&self) -> Option<usize> {
        (self.n_layers_in_recurrent_block.checked_mul(self.mean_recurrence)?)
            .checked_add(self.n_layers_in_prelude)?
            .checked_add(self.n_layers_in_coda)
    }

    /// `√h`, multiplied onto the embedding output and onto the "like-init" initial state.
    pub fn embed_scale(&self) -> f64 {
        (self.n_embd as f64).sqrt()
    }

    /// The reference's init constants ("takase", Takase et al. 2023).
    pub fn init_values(&self) -> InitValues {
        let std = (2.0 / (5.0 * self.n_embd as f64)).sqrt();
        InitValues {
            std,
            out_proj: std / (2.0 * self.effective_expected_depth() as f64).sqrt(),
            embedding: std,
            embed_scale: self.embed_scale(),
        }
    }

    /// Number of unique parameters (the tied head counted once).
    pub fn num_params(&self) -> usize {
        self.checked_num_params()
            .expect("the parameter count overflows usize (validate rejects such a config)")
    }

    /// [`Self::num_params`], or `None` where it overflows: then some tensor's size does too.
    fn checked_num_params(&self) -> Option<usize> {
        let h = self.n_embd;
        let blocks = self
            .n_layers_in_prelude
            .checked_add(self.n_layers_in_recurrent_block)?
            .checked_add(self.n_layers_in_coda)?;
        // Plus the embedding (vh), the adapter (2h²) and ln_f (h).
        blocks
            .checked_mul(self.block_params()?)?
            .checked_add(self.vocab_size.checked_mul(h)?)?
            .checked_add(2usize.checked_mul(h.checked_mul(h)?)?)?
            .checked_add(h)
    }

    /// Parameters of one recurrence step, the adapter and the core blocks: what decoding reads
    /// `r` times per token. Checked by [`Self::validate`] not to overflow.
    pub fn core_params(&self) -> usize {
        let h = self.n_embd;
        (self.n_layers_in_recurrent_block * self.block_params().expect("validated sizes")) + 2 * h * h
    }

    /// The weights of the core's linear layers and the adapter: what a quantized model holds
    /// in 8 or 4 bits of each decoding iteration's reads.
    pub fn core_linear_params(&self) -> usize {
        let (h, i) = (self.n_embd, self.intermediate_size);
        self.n_layers_in_recurrent_block * (4 * h * h + 3 * i * h) + 2 * h * h
    }

    /// Parameters of one transformer block, or `None` where it overflows.
    fn block_params(&self) -> Option<usize> {
        let (h, i) = (self.n_embd, self.intermediate_size);
        let mul = |a: usize, b: usize| a.checked_mul(b);
        // Four norms (4h), Wqkv (3h²), qk_bias (2h), proj (h²), fc (2ih), mlp.proj (ih).
        mul(4, mul(h, h)?)?
            .checked_add(mul(6, h)?)?
            .checked_add(mul(3, mul(i, h)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Huginn-0125's core iteration: 1.64 billion parameters, 3.27 GB in bf16 (the issue's
    /// figure for what decoding streams per iteration).
    #[test]
    fn huginn_0125_core_parameters() {
        let c = HuginnConfig::default();
        assert_eq!(c.core_params(), 1_637_349_120);
        assert!(c.core_params() < c.num_params());
    }

    #[test]
    fn default_is_huginn_0125() {
        let c = HuginnConfig::default();
        assert_eq!(c.head_dim(), 96);
        assert_eq!(c.effective_expected_depth(), 132);
        let iv = c.init_values();
        assert!((iv.std - 0.0087038828).abs() < 1e-9);
        assert!((iv.out_proj - 0.0005356870).abs() < 1e-9);
        assert!((iv.embed_scale - 72.6636085).abs() < 1e-6);
        assert_eq!(c.num_params(), 3_564_976_800);
    }

    #[test]
    fn reads_fixture_config_and_tolerates_unknown_fields() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/reference/tiny-d/config.json"
        ))
        .unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["some_future_field"] = serde_json::json!({"x": 1});
        let c = HuginnConfig::from_json(&value.to_string()).unwrap();
        assert_eq!((c.n_embd, c.n_heads, c.vocab_size), (64, 4, 128));
        assert_eq!(c.n_layers_in_prelude, 2);
        assert_eq!(c.init_values.as_ref().unwrap().embed_scale, 8.0);
        assert_eq!(c.init_values.clone().unwrap(), c.init_values());
    }

    #[test]
    fn round_trips_through_json() {
        let c = HuginnConfig::tiny(100, 32, 4, (1, 2, 1));
        let json = c.to_json();
        assert!(
            !json.contains("null"),
            "the reference's RavenConfig reads no nulls: {json}"
        );
        let back = HuginnConfig::from_json(&json).unwrap();
        assert_eq!(back.head_dim, Some(8));
        assert_eq!(back.n_embd, 32);
        assert_eq!(back.init_values(), c.init_values());
    }

    #[test]
    fn rejects_inconsistent_configs() {
        let full: serde_json::Value =
            serde_json::from_str(&HuginnConfig::tiny(100, 32, 4, (1, 2, 1)).to_json()).unwrap();
        let with = |edits: serde_json::Value| {
            let mut value = full.clone();
            for (key, edit) in edits.as_object().unwrap() {
                value[key] = edit.clone();
            }
            value.to_string()
        };
        let cases = [
            (
                with(json!({"n_embd": 64, "n_heads": 5})),
                "n_heads = 5 does not divide n_embd = 64",
            ),
            (
                with(json!({"n_embd": 60, "n_heads": 4})),
                "head_dim = n_embd / n_heads = 60 / 4 = 15 is odd",
            ),
            (
                with(json!({"n_embd": 64})),
                "head_dim = 8 disagrees with n_embd / n_heads = 64 / 4 = 16",
            ),
            (
                with(json!({"num_key_value_heads": 2})),
                "num_key_value_heads = 2 disagrees with n_heads = 4",
            ),
            (with(json!({"injection_type": "add"})), "injection_type"),
            (with(json!({"n_embd": "wide"})), "n_embd: invalid type: string \"wide\""),
            (with(json!({"rope_base": null})), "rope_base: invalid type: null"),
            (with(json!({"vocab_size": 0})), "vocab_size = 0"),
            (
                with(json!({"intermediate_size": usize::MAX})),
                "beyond what this machine can address",
            ),
            (with(json!({"mean_recurrence": usize::MAX})), "mean_recurrence"),
            (
                with(json!({"block_size": 1_000_000_000_000u64})),
                "block_size = 1000000000000 is over 16777216",
            ),
            (r#"{"n_embd": 64"#.into(), "EOF"),
            ("[64]".into(), "not a JSON object"),
        ];
        for (json, needle) in cases {
            let err = HuginnConfig::from_json(&json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn every_required_field_is_named_when_missing() {
        let full: serde_json::Value =
            serde_json::from_str(&HuginnConfig::tiny(100, 32, 4, (1, 2, 1)).to_json()).unwrap();
        for field in REQUIRED {
            let mut value = full.clone();
            value.as_object_mut().unwrap().remove(field);
            let err = HuginnConfig::from_json(&value.to_string()).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("invalid config: {field} is missing (the weights' shapes depend on it)")
            );
        }
    }
}
