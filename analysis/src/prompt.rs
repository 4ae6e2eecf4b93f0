//! The token ids a capture runs on, with their text when a tokenizer is known (plot labels and
//! the capture's sidecar read better as text than as ids).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::AnalysisError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// The text the ids came from, when they came from text.
    pub text: Option<String>,
    pub tokens: Vec<u32>,
    /// Each token decoded on its own, when a tokenizer is known.
    pub token_text: Option<Vec<String>>,
}

impl Prompt {
    pub fn from_ids(tokens: Vec<u32>) -> Self {
        Self {
            text: None,
            tokens,
            token_text: None,
        }
    }

    /// Tokenizes `text` with the `tokenizer.json` at `tokenizer` (no special tokens added).
    pub fn from_text(text: &str, tokenizer: &Path) -> Result<Self, AnalysisError> {
        let tok = train::text::load_tokenizer(tokenizer).map_err(|e| AnalysisError::Tokenizer(e.to_string()))?;
        let encoding = tok
            .encode(text, false)
            .map_err(|e| AnalysisError::Tokenizer(e.to_string()))?;
        let mut prompt = Self::from_ids(encoding.get_ids().to_vec());
        prompt.text = Some(text.to_string());
        prompt.decode_with(tokenizer)?;
        Ok(prompt)
    }

    /// Fills in each token's text from the `tokenizer.json` at `tokenizer`.
    pub fn decode_with(&mut self, tokenizer: &Path) -> Result<(), AnalysisError> {
        let tok = train::text::load_tokenizer(tokenizer).map_err(|e| AnalysisError::Tokenizer(e.to_string()))?;
        let texts = self
            .tokens
            .iter()
            .map(|&id| {
                tok.decode(&[id], false)
                    .map_err(|e| AnalysisError::Tokenizer(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        self.token_text = Some(texts);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// A short label for position `t`: `3 "the"` with a tokenizer, `3 #791` without.
    pub fn label(&self, t: usize) -> String {
        match &self.token_text {
            Some(texts) => {
                let text: String = texts[t].escape_debug().collect();
                let short: String = text.chars().take(16).collect();
                format!("{t} \"{short}\"")
            }
            None => format!("{t} #{}", self.tokens[t]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_tokens_by_text_or_id() {
        let mut p = Prompt::from_ids(vec![7, 9]);
        assert_eq!(p.label(1), "1 #9");
        p.token_text = Some(vec!["a\nb".into(), " the".into()]);
        assert_eq!(p.label(0), "0 \"a\\nb\"");
        assert_eq!(p.label(1), "1 \" the\"");
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn text_prompts_tokenize_and_decode_per_token() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        let tokenizer = train::text::train_bpe(&[train::text::SHAKESPEARE[..20_000].to_string()], 300).unwrap();
        let path = dir.join("tokenizer.json");
        tokenizer.save(&path, false).unwrap();
        let p = Prompt::from_text("To be, or not", &path).unwrap();
        assert_eq!(p.text.as_deref(), Some("To be, or not"));
        assert_eq!(p.token_text.as_ref().unwrap().concat(), "To be, or not");
        assert_eq!(p.token_text.as_ref().unwrap().len(), p.tokens.len());
        let err = Prompt::from_text("x", &dir.join("missing.json")).unwrap_err();
        assert!(matches!(err, AnalysisError::Tokenizer(_)));
    }
}
