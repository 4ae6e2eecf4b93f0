//! `generation_config.json`: the defaults a model folder ships for generation (special token
//! ids, sampling, length, stop strings), read with the meaning `transformers` gives them.

use serde::Deserialize;

/// The fields of `generation_config.json` generation uses; others are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    /// One id or a list (`transformers` writes either).
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Without it, decoding is greedy whatever the other sampling fields say.
    #[serde(default)]
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Prompt plus new tokens.
    pub max_length: Option<usize>,
    /// New tokens; wins over `max_length`.
    pub max_new_tokens: Option<usize>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub stop_strings: Vec<String>,
}

impl GenerationConfig {
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// New tokens for a prompt of `prompt_len` tokens, when the file sets a length.
    pub fn max_new_tokens(&self, prompt_len: usize) -> Option<usize> {
        self.max_new_tokens
            .or_else(|| self.max_length.map(|total| total.saturating_sub(prompt_len)))
    }
}

/// `null`, a value or a list of values.
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        One(T),
        Many(Vec<T>),
    }
    Ok(match Option::<OneOrMany<T>>::deserialize(deserializer)? {
        None => vec![],
        Some(OneOrMany::One(v)) => vec![v],
        Some(OneOrMany::Many(v)) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huginns_files_read_as_transformers_reads_them() {
        // The released checkpoint's file and the vLLM plugin's.
        let released = GenerationConfig::from_json(
            r#"{"_from_model_config": true, "bos_token_id": 65504, "eos_token_id": 65505,
                "pad_token_id": 65509, "transformers_version": "4.47.1"}"#,
        )
        .unwrap();
        assert_eq!(released.eos_token_id, [65505]);
        assert_eq!(released.max_new_tokens(10), None);
        let vllm = GenerationConfig::from_json(
            r#"{"bos_token_id": 65504, "pad_token_id": 65509, "eos_token_id": [65505, 65508],
                "do_sample": true, "temperature": 0.7, "max_length": 256,
                "stop_strings": ["<|end_text|>", "<|end_turn|>"]}"#,
        )
        .unwrap();
        assert_eq!(vllm.eos_token_id, [65505, 65508]);
        assert_eq!(vllm.stop_strings, ["<|end_text|>", "<|end_turn|>"]);
        assert_eq!((vllm.do_sample, vllm.temperature, vllm.top_k), (true, Some(0.7), None));
        assert_eq!(vllm.max_new_tokens(10), Some(246));
        assert_eq!(vllm.max_new_tokens(300), Some(0));
        let explicit = GenerationConfig::from_json(r#"{"max_new_tokens": 5, "max_length": 9, "top_k": 0}"#).unwrap();
        assert_eq!(explicit.max_new_tokens(10), Some(5));
        assert_eq!(explicit.top_k, Some(0));
        assert_eq!(
            GenerationConfig::from_json(r#"{"eos_token_id": null, "stop_strings": "\n\n"}"#).unwrap(),
            GenerationConfig {
                stop_strings: vec!["\n\n".into()],
                ..Default::default()
            }
        );
    }

    #[test]
    fn wrong_types_are_errors() {
        for bad in [r#"{"eos_token_id": "x"}"#, r#"{"temperature": "hot"}"#, "[1]", "{"] {
            assert!(GenerationConfig::from_json(bad).is_err(), "{bad}");
        }
    }
}
