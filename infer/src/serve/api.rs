//! The wire format: OpenAI-style completion and chat requests (plus this server's recurrence
//! fields), their validation into an engine [`Job`](crate::serve::engine::Job), and the error body every failure gets.

use std::str::FromStr;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use clap::ValueEnum;
use serde::Deserialize;
use serde_json::json;

use crate::adaptive::{AdaptiveConfig, Decoding, Row};
use crate::diffusion::DiffusionConfig;
use crate::exit::Criterion;
use crate::sampling::SamplingConfig;
use crate::score::MAX_TOP;
use crate::serve::engine::Scoring;
use crate::strategy::Strategy;
use crate::warm_start::WarmStart;
use folder::ModelFolder;
use folder::chat::{Message, Role};

/// An error answer: `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.into(),
            code: None,
        }
    }

    pub fn with(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: Some(code),
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

fn param(name: &str) -> Option<String> {
    Some(name.to_string())
}

/// One prompt: text or token ids (a list of one of either is accepted too).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: Content,
    /// Accepted and ignored (OpenAI's participant name).
    #[serde(default)]
    pub name: Option<String>,
}

/// Message content: a string, or a list of text parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields of both endpoints; each endpoint checks it got its own (`prompt` or `messages`).
/// Unknown fields are refused, so a misspelt setting is not silently ignored.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub model: Option<String>,
    pub prompt: Option<Prompt>,
    pub messages: Option<Vec<ChatMessage>>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logprobs: Option<serde_json::Value>,
    /// Chat: alternatives per token, with `logprobs: true`.
    pub top_logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub user: Option<String>,
    /// Recurrence steps per token (the most, with an exit criterion).
    pub num_steps: Option<u32>,
    /// `none`, `kl`, `minp-kl`, `entropy-diff`, `latent-diff`, `cosine`, `argmax-stability`.
    pub exit_criterion: Option<String>,
    /// Default: the criterion's `auto` value.
    pub exit_threshold: Option<f64>,
    /// A reference cache strategy name (`full`, `latest-m4-compress-s16`, …).
    pub cache_strategy: Option<String>,
    /// `cold`, `raw` or `normalized`.
    pub warm_start: Option<String>,
    /// `sequential` (the default) or `diffusion` (the wavefront sampler).
    pub sampler: Option<String>,
    /// The wavefront sampler's knobs (with `sampler: "diffusion"`).
    pub diffusion: Option<DiffusionKnobs>,
}

/// The wavefront sampler's knobs, named as the reference's keyword arguments; each defaults to
/// the reference's value. `num_steps`, `cache_strategy` and `warm_start: "raw"` (its
/// `continuous_compute`) are the request's own fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionKnobs {
    pub headway: Option<usize>,
    pub inner_recurrence: Option<usize>,
    pub ema_embeds: Option<f64>,
    pub state_noise_mixing: Option<f64>,
    pub dampened_state_mixer: Option<bool>,
    pub sqrt_mixer: Option<bool>,
    pub freeze_strategy: Option<String>,
    pub exit_t: Option<f64>,
    pub max_wavefront: Option<usize>,
    pub max_diffusion_steps: Option<usize>,
    pub full_prefill: Option<bool>,
    pub init_scale: Option<f64>,
}

/// The names of [`DiffusionKnobs`]' fields.
const KNOBS: [&str; 12] = [
    "headway",
    "inner_recurrence",
    "ema_embeds",
    "state_noise_mixing",
    "dampened_state_mixer",
    "sqrt_mixer",
    "freeze_strategy",
    "exit_t",
    "max_wavefront",
    "max_diffusion_steps",
    "full_prefill",
    "init_scale",
];

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// What the server allows and defaults to.
#[derive(Debug, Clone)]
pub struct ServerDefaults {
    /// The name `/v1/models` lists; requests naming another model are refused.
    pub model_name: String,
    /// Recurrence steps when a request does not say.
    pub num_steps: usize,
    /// The most recurrence steps a request may ask for.
    pub max_num_steps: usize,
}

/// How much of a request the server reads, from the model's context: text that cannot fit is
/// refused before it is tokenized (tokenizing a megabyte of text takes a couple of hundred
/// megabytes), and a body too big to hold a request that fits is refused before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// The model's context, in tokens.
    pub context: usize,
    /// The longest vocabulary entry, in bytes of UTF-8; `None` without a tokenizer.
    pub token_bytes: Option<usize>,
}

/// Bytes of a request body besides its text: JSON per token of context (a token id, a
/// message's wrapping) and the other fields.
const JSON_BYTES_PER_TOKEN: usize = 64;
const OTHER_FIELDS_BYTES: usize = 64 << 10;

/// The most bytes of a request body whatever the context (a body is held in memory while it is
/// read, once per connection): room for a whole 4096-token context (Huginn-0125's) of tokens up
/// to 300 bytes each, written as `\u` escapes.
pub const MAX_BODY_BYTES: usize = 8 << 20;

impl InputLimits {
    pub fn of(folder: &ModelFolder) -> Self {
        Self {
            context: folder.model.config().block_size,
            token_bytes: folder
                .tokenizer
                .as_ref()
                .and_then(|t| t.get_vocab(true).keys().map(String::len).max()),
        }
    }

    /// The most bytes of text a prompt may have. A token matches at most as many bytes of text
    /// as its vocabulary entry spells (a byte-level entry spells each byte in one or two
    /// characters), so longer text has more tokens than the context. That holds for tokenizers
    /// that drop no text, Huginn's byte-level BPE among them; with one that does (a normalizer
    /// that removes characters), a longer text that would have fit is refused all the same.
    pub fn text_bytes(&self) -> Option<usize> {
        self.token_bytes.map(|bytes| bytes.saturating_mul(self.context))
    }

    /// The most bytes of a request body: the longest text with every byte written as a `\u`
    /// escape (six bytes), plus the JSON around it; at most [`MAX_BODY_BYTES`].
    pub fn body_bytes(&self) -> usize {
        self.text_bytes()
            .unwrap_or(0)
            .saturating_mul(6)
            .saturating_add(self.context.saturating_mul(JSON_BYTES_PER_TOKEN))
            .saturating_add(OTHER_FIELDS_BYTES)
            .min(MAX_BODY_BYTES)
    }

    /// Refuses `bytes` of prompt text that cannot fit the context, before it is tokenized.
    fn check_text(&self, bytes: usize, name: &str) -> Result<(), ApiError> {
        match (self.text_bytes(), self.token_bytes) {
            (Some(most), Some(per_token)) if bytes > most => Err(ApiError {
                param: param(name),
                ..ApiError::with(
                    StatusCode::BAD_REQUEST,
                    "context_length_exceeded",
                    format!(
                        "the prompt's text is {bytes} bytes, more than the context of {} tokens can hold \
                         ({most} bytes: no token of this tokenizer is over {per_token} bytes)",
                        self.context
                    ),
                )
            }),
            _ => Ok(()),
        }
    }
}

/// A validated request: the engine's row and settings, and how to answer.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub row: Row,
    pub config: AdaptiveConfig,
    /// Set when the request asked for the wavefront sampler.
    pub diffusion: Option<DiffusionConfig>,
    pub stop_strings: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Set when the request asked for log probabilities (`logprobs`, `echo`).
    pub scoring: Option<Scoring>,
    /// The answer repeats the prompt, with its log probabilities.
    pub echo: bool,
}

/// What a model name's suffixes set: `NAME@r=16` the recurrence steps, `NAME@exit=kl:5e-4` an
/// exit criterion and its threshold (`NAME@exit=kl` its automatic one); both may be given
/// (`NAME@r=32@exit=kl`). Clients that send only standard fields (lm-eval) pick a depth this way.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NameSettings {
    pub num_steps: Option<u32>,
    pub exit_criterion: Option<String>,
    pub exit_threshold: Option<f64>,
}

/// The suffixes a model name may carry, as `/v1/models` lists them.
pub const NAME_SUFFIXES: [&str; 2] = ["@r=STEPS", "@exit=CRITERION[:THRESHOLD]"];

impl NameSettings {
    /// Splits `name` into the server's model name and its settings; `None` when the base is
    /// another model.
    pub fn parse(name: &str, model_name: &str) -> Option<Result<Self, ApiError>> {
        let rest = name.strip_prefix(model_name)?;
        if !(rest.is_empty() || rest.starts_with('@')) {
            return None;
        }
        let bad = |what: &str| {
            Some(Err(ApiError::invalid(
                param("model"),
                format!(
                    "{what} in the model name `{name}`; suffixes are {} (e.g. `{model_name}@r=16`)",
                    NAME_SUFFIXES.join(", ")
                ),
            )))
        };
        let mut settings = Self::default();
        for part in rest.split('@').skip(1) {
            match part.split_once('=') {
                Some(("r", steps)) if settings.num_steps.is_none() => match steps.parse() {
                    Ok(n) => settings.num_steps = Some(n),
                    Err(_) => return bad(&format!("`r={steps}` is not a number of steps")),
                },
                Some(("exit", exit)) if settings.exit_criterion.is_none() => {
                    let (criterion, threshold) = match exit.split_once(':') {
                        Some((c, t)) => match t.parse::<f64>() {
                            Ok(t) => (c, Some(t)),
                            Err(_) => return bad(&format!("`{t}` is not an exit threshold")),
                        },
                        None => (exit, None),
                    };
                    settings.exit_criterion = Some(criterion.to_string());
                    settings.exit_threshold = threshold;
                }
                _ => return bad(&format!("`@{part}` is not a suffix (or repeats one)")),
            }
        }
        Some(Ok(settings))
    }
}

/// Reads a request body; every failure names what is wrong.
pub fn read_request(body: &[u8]) -> Result<Request, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid UTF-8: {e}")))?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let request: Request = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // Broken JSON names no field: the message says where it breaks.
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid(None, format!("the request body is not valid JSON: {inner}"));
        }
        if path == "." {
            ApiError::invalid(None, format!("invalid request: {inner}"))
        } else {
            ApiError::invalid(Some(path.clone()), format!("invalid value for `{path}`: {inner}"))
        }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::invalid(None, format!("the request body is not valid JSON: {e}")))?;
    Ok(request)
}

impl Request {
    /// Checks the request against the endpoint, the model and the server's limits.
    pub fn validate(
        self,
        endpoint: Endpoint,
        folder: &ModelFolder,
        defaults: &ServerDefaults,
        limits: &InputLimits,
    ) -> Result<Parsed, ApiError> {
        let named = match &self.model {
            None => NameSettings::default(),
            Some(name) => match NameSettings::parse(name, &defaults.model_name) {
                Some(settings) => settings?,
                None => return Err(Self::no_such_model(name, defaults)),
            },
        };
        let mut this = self;
        for (field, set) in [
            ("num_steps", named.num_steps.is_some() && this.num_steps.is_some()),
            (
                "exit_criterion",
                named.exit_criterion.is_some() && this.exit_criterion.is_some(),
            ),
            (
                "exit_threshold",
                named.exit_threshold.is_some() && this.exit_threshold.is_some(),
            ),
        ] {
            if set {
                return Err(ApiError::invalid(
                    param(field),
                    format!("`{field}` is set both by the model name and by the field; give it once"),
                ));
            }
        }
        this.num_steps = this.num_steps.or(named.num_steps);
        this.exit_criterion = this.exit_criterion.or(named.exit_criterion);
        this.exit_threshold = this.exit_threshold.or(named.exit_threshold);
        this.checked(endpoint, folder, defaults, limits)
    }

    fn no_such_model(name: &str, defaults: &ServerDefaults) -> ApiError {
        ApiError {
            param: param("model"),
            ..ApiError::with(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "the model `{name}` does not exist; this server has `{}` (with suffixes {})",
                    defaults.model_name,
                    NAME_SUFFIXES.join(", ")
                ),
            )
        }
    }

    /// [`Self::validate`] once the model name's settings are in the fields.
    fn checked(
        self,
        endpoint: Endpoint,
        folder: &ModelFolder,
        defaults: &ServerDefaults,
        limits: &InputLimits,
    ) -> Result<Parsed, ApiError> {
        self.unsupported(endpoint)?;
        let scoring = self.scoring(endpoint)?;
        let echo = self.echo == Some(true);
        let prompt = match endpoint {
            Endpoint::Completions => {
                if self.messages.is_some() {
                    return Err(ApiError::invalid(
                        param("messages"),
                        "`messages` belongs to /v1/chat/completions",
                    ));
                }
                let prompt = self
                    .prompt
                    .clone()
                    .ok_or_else(|| ApiError::invalid(param("prompt"), "`prompt` is required"))?;
                self.encode_prompt(prompt, folder, limits)?
            }
            Endpoint::Chat => {
                if self.prompt.is_some() {
                    return Err(ApiError::invalid(
                        param("prompt"),
                        "`prompt` belongs to /v1/completions",
                    ));
                }
                let messages = self
                    .messages
                    .as_deref()
                    .ok_or_else(|| ApiError::invalid(param("messages"), "`messages` is required"))?;
                encode_chat(messages, folder, limits)?
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid(param("prompt"), "the prompt is empty"));
        }
        let vocab = folder.model.config().vocab_size;
        if let Some(id) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::invalid(
                param("prompt"),
                format!("token id {id} is outside the vocabulary of {vocab}"),
            ));
        }
        let context = folder.model.config().block_size;
        let room = context.saturating_sub(prompt.len());
        if room == 0 {
            return Err(ApiError::with(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                format!("the prompt has {} tokens; the context is {context}", prompt.len()),
            ));
        }
        let max_new = match (self.max_tokens.or(self.max_completion_tokens), endpoint) {
            // Pure scoring: the prompt's log probabilities and nothing new.
            (Some(0), _) if echo => 0,
            (Some(0), _) => {
                return Err(ApiError::invalid(
                    param("max_tokens"),
                    "`max_tokens` must be at least 1",
                ));
            }
            (Some(n), _) => n as usize,
            (None, Endpoint::Completions) => 16.min(room),
            (None, Endpoint::Chat) => folder
                .generation
                .max_new_tokens(prompt.len())
                .map_or(room, |n| n.min(room)),
        };
        if prompt.len() + max_new > context {
            return Err(ApiError::with(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                format!(
                    "the prompt's {} tokens plus max_tokens {max_new} exceed the context of {context}",
                    prompt.len()
                ),
            ));
        }
        if scoring.is_some() && self.sampler.as_deref().is_some_and(|s| s != "sequential") {
            return Err(ApiError::invalid(
                param("sampler"),
                "`logprobs` and `echo` score with the sequential sampler only",
            ));
        }
        let config = self.recurrence(defaults)?;
        let sampling = self.sampling(folder, vocab)?;
        let diffusion = self.diffusion(&config, sampling.seed, prompt.len(), context, defaults)?;
        let stop_strings = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop_strings.iter().any(String::is_empty) {
            return Err(ApiError::invalid(param("stop"), "stop strings must not be empty"));
        }
        if stop_strings.len() > 16 {
            return Err(ApiError::invalid(param("stop"), "at most 16 stop strings"));
        }
        if !stop_strings.is_empty() && folder.tokenizer.is_none() {
            return Err(ApiError::invalid(
                param("stop"),
                "stop strings need the model's tokenizer, which this model folder lacks; use stop_token_ids",
            ));
        }
        let stop_tokens = self.stop_token_ids.clone().unwrap_or_default();
        if let Some(id) = stop_tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::invalid(
                param("stop_token_ids"),
                format!("token id {id} is outside the vocabulary of {vocab}"),
            ));
        }
        Ok(Parsed {
            row: Row {
                prompt,
                max_new,
                decoding: Decoding { sampling, stop_tokens },
            },
            config,
            diffusion,
            stop_strings,
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            scoring,
            echo,
        })
    }

    /// `logprobs` and `echo`: either asks for scoring. On completions `logprobs` is a number of
    /// alternatives (`0..=20`); on chat it is `true` or `false`, with `top_logprobs` the number.
    fn scoring(&self, endpoint: Endpoint) -> Result<Option<Scoring>, ApiError> {
        if endpoint == Endpoint::Chat {
            let wanted = match &self.logprobs {
                None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
                Some(serde_json::Value::Bool(true)) => true,
                Some(value) => {
                    return Err(ApiError::invalid(
                        param("logprobs"),
                        format!(
                            "`logprobs` must be true or false here (got {value}); `top_logprobs` sets the alternatives"
                        ),
                    ));
                }
            };
            let top = self.top_logprobs.map_or(0, |n| n as usize);
            if top > MAX_TOP || (top > 0 && !wanted) {
                return Err(ApiError::invalid(
                    param("top_logprobs"),
                    format!("`top_logprobs` must be in 0..={MAX_TOP}, with `logprobs: true`"),
                ));
            }
            return Ok(wanted.then_some(Scoring { top, prompt: false }));
        }
        let top = match &self.logprobs {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => None,
            Some(value) => match value.as_u64() {
                Some(n) if n as usize <= MAX_TOP => Some(n as usize),
                _ => {
                    return Err(ApiError::invalid(
                        param("logprobs"),
                        format!("`logprobs` must be a number of alternatives in 0..={MAX_TOP} (got {value})"),
                    ));
                }
            },
        };
        let echo = self.echo == Some(true);
        Ok((top.is_some() || echo).then(|| Scoring {
            top: top.unwrap_or(0),
            prompt: echo,
        }))
    }

    /// Fields of the OpenAI API this server accepts only at their neutral values.
    fn unsupported(&self, endpoint: Endpoint) -> Result<(), ApiError> {
        let refuse = |name: &str, what: &str| Err(ApiError::invalid(param(name), format!("`{name}` {what}")));
        if self.n.is_some_and(|n| n != 1) {
            return refuse("n", "must be 1: one completion per request");
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return refuse("presence_penalty", "is not supported (use repetition_penalty)");
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return refuse("frequency_penalty", "is not supported (use repetition_penalty)");
        }
        match endpoint {
            Endpoint::Chat if self.echo == Some(true) => return refuse("echo", "belongs to /v1/completions"),
            Endpoint::Completions if self.top_logprobs.is_some() => {
                return refuse(
                    "top_logprobs",
                    "belongs to /v1/chat/completions (here `logprobs` is the number of alternatives)",
                );
            }
            _ => {}
        }
        if self.stream_options.is_some() && !self.stream {
            return refuse("stream_options", "is only allowed with `stream: true`");
        }
        Ok(())
    }

    fn encode_prompt(&self, prompt: Prompt, folder: &ModelFolder, limits: &InputLimits) -> Result<Vec<u32>, ApiError> {
        let one = |n: usize| {
            if n == 1 {
                Ok(())
            } else {
                Err(ApiError::invalid(param("prompt"), "one prompt per request"))
            }
        };
        let text = match prompt {
            Prompt::Ids(ids) => return Ok(ids),
            Prompt::IdLists(mut lists) => {
                one(lists.len())?;
                return Ok(lists.pop().expect("one list"));
            }
            Prompt::Text(text) => text,
            Prompt::Texts(mut texts) => {
                one(texts.len())?;
                texts.pop().expect("one text")
            }
        };
        limits.check_text(text.len(), "prompt")?;
        folder
            .encode(&text)
            .map_err(|e| ApiError::invalid(param("prompt"), e.to_string()))
    }

    fn recurrence(&self, defaults: &ServerDefaults) -> Result<AdaptiveConfig, ApiError> {
        let steps = self.num_steps.map_or(defaults.num_steps, |n| n as usize);
        if steps == 0 || steps > defaults.max_num_steps {
            return Err(ApiError::invalid(
                param("num_steps"),
                format!("`num_steps` must be in 1..={}", defaults.max_num_steps),
            ));
        }
        let criterion = match &self.exit_criterion {
            None => Criterion::None,
            Some(name) => Criterion::from_str(name).map_err(|e| ApiError::invalid(param("exit_criterion"), e))?,
        };
        let threshold = self.exit_threshold.unwrap_or(criterion.auto_threshold());
        if !(threshold.is_finite() && threshold >= 0.0) {
            return Err(ApiError::invalid(
                param("exit_threshold"),
                "`exit_threshold` must be a finite number >= 0",
            ));
        }
        let strategy = match &self.cache_strategy {
            None => Strategy::default(),
            Some(name) => Strategy::from_str(name).map_err(|e| ApiError::invalid(param("cache_strategy"), e))?,
        };
        let warm_start = match &self.warm_start {
            None => WarmStart::Cold,
            Some(name) => WarmStart::from_str(name, false).map_err(|_| {
                ApiError::invalid(
                    param("warm_start"),
                    format!("unknown warm start {name:?}; use cold, raw or normalized"),
                )
            })?,
        };
        Ok(AdaptiveConfig {
            criterion,
            threshold,
            max_steps: steps,
            warm_start,
            strategy,
        })
    }

    /// The wavefront sampler's settings when `sampler` asks for it; combinations it cannot run
    /// are refused by name, before any work: a headway beyond the positions left after the
    /// prompt (whose wave could not fit the context), an inner recurrence beyond the server's
    /// step limit, a prompt that cannot be the first wave.
    fn diffusion(
        &self,
        shared: &AdaptiveConfig,
        seed: u64,
        prompt: usize,
        context: usize,
        defaults: &ServerDefaults,
    ) -> Result<Option<DiffusionConfig>, ApiError> {
        match self.sampler.as_deref() {
            None | Some("sequential") => {
                if self.diffusion.is_some() {
                    return Err(ApiError::invalid(
                        param("diffusion"),
                        "`diffusion` needs `sampler: \"diffusion\"`",
                    ));
                }
                return Ok(None);
            }
            Some("diffusion") => {}
            Some(other) => {
                return Err(ApiError::invalid(
                    param("sampler"),
                    format!("unknown sampler {other:?}; use sequential or diffusion"),
                ));
            }
        }
        if self.exit_criterion.is_some() || self.exit_threshold.is_some() {
            return Err(ApiError::invalid(
                param("exit_criterion"),
                "the diffusion sampler freezes positions by `diffusion.freeze_strategy`; leave out `exit_criterion` and `exit_threshold`",
            ));
        }
        if shared.warm_start == WarmStart::Normalized {
            return Err(ApiError::invalid(
                param("warm_start"),
                "the diffusion sampler carries raw states: `warm_start` must be cold or raw",
            ));
        }
        let knobs = self.diffusion.clone().unwrap_or_default();
        let d = DiffusionConfig::default();
        let freeze = match &knobs.freeze_strategy {
            None => d.freeze,
            Some(name) => name
                .parse()
                .map_err(|e: String| ApiError::invalid(param("diffusion.freeze_strategy"), e))?,
        };
        let config = DiffusionConfig {
            num_steps: shared.max_steps,
            inner_recurrence: knobs.inner_recurrence.unwrap_or(d.inner_recurrence),
            headway: knobs.headway.unwrap_or(d.headway),
            ema_embeds: knobs.ema_embeds.unwrap_or(d.ema_embeds),
            state_noise_mixing: knobs.state_noise_mixing.unwrap_or(d.state_noise_mixing),
            dampened_state_mixer: knobs.dampened_state_mixer.unwrap_or(d.dampened_state_mixer),
            sqrt_mixer: knobs.sqrt_mixer.unwrap_or(d.sqrt_mixer),
            freeze,
            exit_t: knobs.exit_t.unwrap_or(d.exit_t),
            max_wavefront: knobs.max_wavefront.unwrap_or(d.max_wavefront),
            max_diffusion_steps: knobs.max_diffusion_steps.unwrap_or(d.max_diffusion_steps),
            full_prefill: knobs.full_prefill.unwrap_or(d.full_prefill),
            continuous_compute: shared.warm_start == WarmStart::Raw,
            init_scale: knobs.init_scale.unwrap_or(d.init_scale),
            seed,
            strategy: if self.cache_strategy.is_some() {
                shared.strategy
            } else {
                d.strategy
            },
        };
        let room = context - prompt;
        if !(1..=room).contains(&config.headway) {
            return Err(ApiError::invalid(
                param("diffusion.headway"),
                format!(
                    "`diffusion.headway` must be in 1..={room}: the positions left in the context of {context} after the prompt's {prompt}"
                ),
            ));
        }
        if config.inner_recurrence > defaults.max_num_steps {
            return Err(ApiError::invalid(
                param("diffusion.inner_recurrence"),
                format!(
                    "`diffusion.inner_recurrence` must be in 1..={} (the server's most recurrence steps)",
                    defaults.max_num_steps
                ),
            ));
        }
        if !config.full_prefill && config.max_wavefront > 0 && prompt > config.max_wavefront {
            return Err(ApiError::invalid(
                param("diffusion.full_prefill"),
                format!(
                    "`diffusion.full_prefill: false` makes the prompt the first wave: its {prompt} tokens must fit `diffusion.max_wavefront` ({})",
                    config.max_wavefront
                ),
            ));
        }
        config.validate().map_err(|e| {
            // The sampler's messages start with the knob's name.
            let message = e.to_string();
            let knob = message
                .trim_start_matches("invalid diffusion setting: ")
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .filter(|word| KNOBS.contains(word))
                .map_or("diffusion".to_string(), |knob| format!("diffusion.{knob}"));
            ApiError::invalid(Some(knob), message)
        })?;
        Ok(Some(config))
    }

    /// The folder's defaults (`generation_config.json`) with the request's fields over them;
    /// without a `seed`, a fresh one (as OpenAI's API: the same request samples anew).
    fn sampling(&self, folder: &ModelFolder, vocab: usize) -> Result<SamplingConfig, ApiError> {
        let defaults = SamplingConfig::from_generation_config(&folder.generation, self.seed.unwrap_or_else(fresh_seed));
        let sampling = SamplingConfig {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.map(|k| k as usize).or(defaults.top_k),
            top_p: self.top_p.or(defaults.top_p),
            min_p: self.min_p.or(defaults.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            seed: defaults.seed,
        };
        sampling.validate().map_err(|e| {
            // The message names the setting first.
            let field = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty"]
                .into_iter()
                .find(|field| e.trim_start_matches("invalid sampling setting: ").starts_with(field));
            ApiError::invalid(field.map(str::to_string), e)
        })?;
        if sampling.temperature > 100.0 {
            return Err(ApiError::invalid(
                param("temperature"),
                "`temperature` must be at most 100",
            ));
        }
        if sampling.top_k.is_some_and(|k| k > vocab) {
            return Err(ApiError::invalid(
                param("top_k"),
                format!("`top_k` must be at most the vocabulary size {vocab}"),
            ));
        }
        Ok(sampling)
    }
}

/// A random seed below 2^53, so that it reads back exactly from the answer with any JSON
/// parser (JavaScript's numbers are doubles).
pub fn fresh_seed() -> u64 {
    rand::random::<u64>() >> 11
}

fn encode_chat(messages: &[ChatMessage], folder: &ModelFolder, limits: &InputLimits) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(param("messages"), "`messages` is empty"));
    }
    // Bounded before the template runs, which wraps the text in more (Huginn's also trims it).
    let text_bytes: usize = messages
        .iter()
        .map(|m| match &m.content {
            Content::Text(text) => text.len(),
            Content::Parts(parts) => parts.iter().map(|p| p.text.len()).sum(),
        })
        .sum();
    limits.check_text(text_bytes, "messages")?;
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::invalid(
                        Some(format!("messages[{i}].role")),
                        format!("unknown role {other:?}; use system, user or assistant"),
                    ));
                }
            };
            let content = match &m.content {
                Content::Text(text) => text.clone(),
                Content::Parts(parts) => {
                    if let Some(part) = parts.iter().find(|p| p.kind != "text") {
                        return Err(ApiError::invalid(
                            Some(format!("messages[{i}].content")),
                            format!("content parts of type {:?} are not supported (text only)", part.kind),
                        ));
                    }
                    parts.iter().map(|p| p.text.as_str()).collect()
                }
            };
            Ok(Message::new(role, content))
        })
        .collect::<Result<Vec<_>, _>>()?;
    folder
        .encode_chat(&messages)
        .map_err(|e| ApiError::invalid(param("messages"), e.to_string()))
}
