//! A Hugging Face model folder: the weights (`Huginn::from_pretrained`) and, when present, the
//! files that turn it into a text model: `tokenizer.json`, `tokenizer_config.json` (special
//! tokens, chat template), `chat_template.jinja` (where newer `transformers` save the template)
//! and `generation_config.json`. A missing optional file is fine; a malformed one is an error
//! naming it.

use std::path::{Path, PathBuf};

use model::burn::prelude::Device;
use model::{Bits, Huginn, WeightsError};
use serde::Deserialize;
use thiserror::Error;
use tokenizers::Tokenizer;

use crate::chat::{ChatError, ChatTemplate, Message, SpecialTokens};
use crate::generation_config::GenerationConfig;

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Tokens the reference's generation always stops on (`_get_stops`: ids 65504, 65505 and
/// 65508 of Huginn's vocabulary), whatever `generation_config.json` says.
const REFERENCE_STOPS: [&str; 3] = ["<|begin_text|>", "<|end_text|>", "<|end_turn|>"];

#[derive(Debug, Error)]
pub enum FolderError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The `io::Error` is not a `source`: `{:#}` would print its text twice.
    #[error("cannot read {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("the model folder has no {0}")]
    Missing(&'static str),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("cannot tokenize the prompt: {0}")]
    Encode(String),
}

/// A model with what its folder says about text and generation.
#[derive(Debug)]
pub struct ModelFolder {
    pub model: Huginn,
    pub tokenizer: Option<Tokenizer>,
    pub special_tokens: SpecialTokens,
    pub chat_template: Option<ChatTemplate>,
    /// The defaults of `generation_config.json` (all unset without it).
    pub generation: GenerationConfig,
    /// Tokens that end a sequence (kept in its tokens, left out of its text): the end-of-sequence
    /// ids of `generation_config.json`, the tokenizer's `eos_token`, the reference's stops, and
    /// stop strings that are one special token.
    pub stop_tokens: Vec<u32>,
    /// Text that ends a sequence (`stop_strings` of `generation_config.json`).
    pub stop_strings: Vec<String>,
}

impl ModelFolder {
    /// A model without any of the text files.
    pub fn from_model(model: Huginn) -> Self {
        Self {
            model,
            tokenizer: None,
            special_tokens: SpecialTokens::default(),
            chat_template: None,
            generation: GenerationConfig::default(),
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
        }
    }

    pub fn open(dir: impl AsRef<Path>, device: &Device) -> Result<Self, FolderError> {
        Self::open_quantized(dir, device, None)
    }

    /// [`ModelFolder::open`] with the weights rounded to `quantize` bits as they load
    /// ([`Huginn::from_pretrained_quantized`]).
    pub fn open_quantized(dir: impl AsRef<Path>, device: &Device, quantize: Option<Bits>) -> Result<Self, FolderError> {
        let dir = dir.as_ref();
        let model = Huginn::from_pretrained_quantized(dir, device, quantize)?;
        let TextFiles {
            tokenizer,
            special_tokens,
            chat_template,
        } = TextFiles::open(dir, model.config().vocab_size)?;
        let generation = read_optional(dir, GENERATION_CONFIG_FILE, |text| {
            GenerationConfig::from_json(text).map_err(|e| format!("invalid generation config: {e}"))
        })?
        .unwrap_or_default();
        let mut folder = Self {
            model,
            tokenizer,
            special_tokens,
            chat_template,
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
            generation,
        };
        let mut stops = folder.generation.eos_token_id.clone();
        if let Some(tokenizer) = &folder.tokenizer {
            let named = folder
                .special_tokens
                .eos
                .iter()
                .map(String::as_str)
                .chain(REFERENCE_STOPS);
            stops.extend(named.filter_map(|token| tokenizer.token_to_id(token)));
        }
        folder.add_stop_tokens(stops);
        folder.add_stop_strings(folder.generation.stop_strings.clone());
        Ok(folder)
    }

    pub fn add_stop_tokens(&mut self, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            if !self.stop_tokens.contains(&id) {
                self.stop_tokens.push(id);
            }
        }
    }

    /// Adds stop strings. One that is a special token (`<|end_turn|>`) is never in the decoded
    /// text, which leaves special tokens out, so it becomes a stop token.
    pub fn add_stop_strings(&mut self, strings: impl IntoIterator<Item = String>) {
        for s in strings {
            let special = self.tokenizer.as_ref().and_then(|t| {
                t.get_added_vocabulary()
                    .is_special_token(&s)
                    .then(|| t.token_to_id(&s))
                    .flatten()
            });
            match special {
                Some(id) => self.add_stop_tokens([id]),
                None if !self.stop_strings.contains(&s) => self.stop_strings.push(s),
                None => {}
            }
        }
    }

    /// Token ids of a plain prompt: the text as is (not post-processed: Huginn's tokenizer
    /// would append `<|end_text|>`), after the BOS token when the folder names one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, FolderError> {
        let tokenizer = self.tokenizer()?;
        let bos = match &self.special_tokens.bos {
            Some(token) => tokenizer.token_to_id(token),
            None => self.generation.bos_token_id,
        };
        Ok(bos.into_iter().chain(self.tokenize(text)?).collect())
    }

    /// Token ids of a conversation through the chat template, ready for the assistant's reply;
    /// the template writes every special token itself.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, FolderError> {
        self.tokenizer()?;
        let template = self.chat_template.as_ref().ok_or(FolderError::Missing(
            "chat template (chat_template in tokenizer_config.json, or chat_template.jinja)",
        ))?;
        self.tokenize(&template.render(messages, true)?)
    }

    fn tokenizer(&self) -> Result<&Tokenizer, FolderError> {
        self.tokenizer
            .as_ref()
            .ok_or(FolderError::Missing("tokenizer (tokenizer.json)"))
    }

    /// Token ids of `text` alone, without the beginning-of-sequence token [`Self::encode`]
    /// puts first (as lm-eval encodes a task's text by default).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, FolderError> {
        let encoding = self
            .tokenizer()?
            .encode(text, false)
            .map_err(|e| FolderError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }
}

fn invalid(dir: &Path, file: &str, reason: String) -> FolderError {
    FolderError::Invalid {
        path: dir.join(file),
        reason,
    }
}

/// Parses `dir/file` when it exists.
/// A folder's tokenizer, special tokens and chat template, without its weights (what training
/// on chat data needs).
#[derive(Debug)]
pub struct TextFiles {
    pub tokenizer: Option<Tokenizer>,
    pub special_tokens: SpecialTokens,
    pub chat_template: Option<ChatTemplate>,
}

impl TextFiles {
    /// Reads the text files of `dir`, for a model of `vocab` tokens.
    pub fn open(dir: &Path, vocab: usize) -> Result<Self, FolderError> {
        let tokenizer = read_optional(dir, TOKENIZER_FILE, |text| {
            let tokenizer: Tokenizer = text.parse().map_err(|e| format!("invalid tokenizer: {e}"))?;
            match tokenizer.get_vocab(true).values().max() {
                Some(&max) if max as usize >= vocab => {
                    Err(format!("token id {max} is outside the model's vocabulary of {vocab}"))
                }
                _ => Ok(tokenizer),
            }
        })?;
        let config = read_optional(dir, TOKENIZER_CONFIG_FILE, TokenizerConfig::from_json)?.unwrap_or_default();
        let special_tokens = SpecialTokens {
            bos: config.bos_token.map(TokenText::into_string),
            eos: config.eos_token.map(TokenText::into_string),
            pad: config.pad_token.map(TokenText::into_string),
            unk: config.unk_token.map(TokenText::into_string),
        };
        let compile = |source: &str| ChatTemplate::new(source, special_tokens.clone()).map_err(|e| e.to_string());
        let chat_template = match read_optional(dir, CHAT_TEMPLATE_FILE, compile)? {
            Some(template) => Some(template),
            None => config
                .chat_template
                .map(|field| {
                    field
                        .default_template()
                        .and_then(|source| compile(&source))
                        .map_err(|reason| invalid(dir, TOKENIZER_CONFIG_FILE, reason))
                })
                .transpose()?,
        };
        Ok(Self {
            tokenizer,
            special_tokens,
            chat_template,
        })
    }
}

fn read_optional<T>(
    dir: &Path,
    file: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, FolderError> {
    let path = dir.join(file);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|error| FolderError::Io { path, error })?;
    parse(&text).map(Some).map_err(|reason| invalid(dir, file, reason))
}

/// The fields of `tokenizer_config.json` read here.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    bos_token: Option<TokenText>,
    eos_token: Option<TokenText>,
    pad_token: Option<TokenText>,
    unk_token: Option<TokenText>,
    chat_template: Option<TemplateField>,
}

impl TokenizerConfig {
    fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("invalid tokenizer config: {e}"))
    }
}

/// A special token as text, or as `transformers`' serialized `AddedToken`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenText {
    Text(String),
    Added { content: String },
}

impl TokenText {
    fn into_string(self) -> String {
        match self {
            TokenText::Text(s) | TokenText::Added { content: s } => s,
        }
    }
}

/// One template, or named ones of which `transformers` uses "default" for plain chat.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

impl TemplateField {
    fn default_template(self) -> Result<String, String> {
        match self {
            TemplateField::One(source) => Ok(source),
            TemplateField::Named(list) => list
                .into_iter()
                .find(|t| t.name == "default")
                .map(|t| t.template)
                .ok_or_else(|| "chat_template lists no template named \"default\"".to_string()),
        }
    }
}
