//! `huginn serve`: an OpenAI-style HTTP server over the engine, with per-request recurrence
//! (steps, exit criterion, cache strategy, warm start) and streaming by server-sent events.
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//! `GET /health`, `GET /metrics`. Every error is a JSON body `{"error": {...}}` with a 4xx/5xx
//! status; a full queue answers 503 and shutting down finishes (then, after a grace period,
//! cancels) what is running. Bodies and prompt text are bounded by what the model's context can hold. Every
//! answer, and every streamed chunk, carries the `seed` its sampling used (drawn afresh when
//! the request gave none), so that a sampled answer can be asked for again.
//!
//! `/v1/completions` scores too: `logprobs` (alternatives per token) and `echo` (the prompt's
//! own log probabilities) with `max_tokens` 0 or 1, as lm-eval's `local-completions` asks for
//! multiple-choice answers; a model name's suffix (`NAME@r=16`, `NAME@exit=kl:5e-4`) sets the
//! recurrence for clients that send only standard fields.

pub mod api;
pub mod connections;
pub mod engine;
pub mod logprobs;
pub mod metrics;
mod running;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{BodyDataStream, Bytes};
use axum::extract::{Request as HttpRequest, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use api::{ApiError, Endpoint, InputLimits, NAME_SUFFIXES, ServerDefaults};
use connections::BodyTimeout;
pub use connections::{ConnectionLimits, PROBE_EVERY};
use engine::{Engine, EngineLimits, Event, Finish, Job, Refusal};
use folder::ModelFolder;
use metrics::{Clock, EngineState, Metrics};

/// Everything the handlers share.
pub struct App {
    folder: Arc<ModelFolder>,
    engine: Engine,
    defaults: ServerDefaults,
    input: InputLimits,
    api_key: Option<String>,
    draining: AtomicBool,
    next_id: AtomicU64,
    started: u64,
    metrics: Arc<Metrics>,
}

impl App {
    /// Starts the engine on `folder`.
    pub fn new(folder: ModelFolder, defaults: ServerDefaults, limits: EngineLimits, api_key: Option<String>) -> Self {
        let folder = Arc::new(folder);
        Self {
            engine: Engine::start(folder.clone(), limits),
            input: InputLimits::of(&folder),
            folder,
            defaults,
            api_key,
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            started: unix_seconds(),
            metrics: Arc::new(Metrics::new()),
        }
    }
}

impl App {
    /// Requests waiting and requests being decoded.
    pub fn engine_load(&self) -> (usize, usize) {
        (self.engine.queued(), self.engine.running())
    }

    /// Tokens generated since the start.
    pub fn tokens_generated(&self) -> usize {
        self.engine.generated()
    }

    /// What the server reads of a request.
    pub fn input_limits(&self) -> InputLimits {
        self.input
    }
}

/// The routes over `app`.
pub fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(app.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { ApiError::with(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// Serves until `shutdown` resolves, then stops taking requests, lets running ones finish for
/// up to the grace period, cancels what is left and returns once every connection is closed
/// (at most a second after the grace period, whatever state the clients left them in).
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    connections::run(listener, app.clone(), router(app), shutdown, limits).await
}

/// A route asked with a method it does not answer: 405, with the JSON error every answer has
/// (the `Allow` header lists the methods it does answer).
async fn method_not_allowed(request: HttpRequest) -> ApiError {
    ApiError::with(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", request.method(), request.uri().path()),
    )
}

async fn authorize(State(app): State<Arc<App>>, request: HttpRequest, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::with(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or wrong API key (send `Authorization: Bearer KEY`)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// 200 while the engine runs ("ok", or "shutting down" while draining); 503 once it has
/// stopped, since the server then cannot answer.
async fn health(State(app): State<Arc<App>>) -> Response {
    let (code, status) = if !app.engine.alive() {
        (StatusCode::SERVICE_UNAVAILABLE, "engine stopped")
    } else if app.draining.load(Ordering::Acquire) {
        (StatusCode::OK, "shutting down")
    } else {
        (StatusCode::OK, "ok")
    };
    let body = json!({
        "status": status,
        "queued": app.engine.queued(),
        "running": app.engine.running(),
        "tokens_generated": app.engine.generated(),
    });
    (code, axum::Json(body)).into_response()
}

/// The server's metrics in the Prometheus text format; open like `/health` (a count of
/// requests and tokens, nothing of their content).
async fn metrics(State(app): State<Arc<App>>) -> Response {
    let kv = app.engine.kv_bytes();
    let text = app.metrics.render(EngineState {
        waiting: app.engine.queued(),
        running: app.engine.running(),
        kv_bytes: kv.in_use,
        kv_reserved: kv.reserved,
        kv_budget: kv.budget,
    });
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let config = app.folder.model.config();
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": app.defaults.model_name,
            "object": "model",
            "created": app.started,
            "owned_by": "huginn-rs",
            "context_length": config.block_size,
            "mean_recurrence": config.mean_recurrence,
            "default_num_steps": app.defaults.num_steps,
            "max_num_steps": app.defaults.max_num_steps,
            "name_suffixes": NAME_SUFFIXES,
        }],
    }))
    .into_response()
}

async fn completions(State(app): State<Arc<App>>, request: HttpRequest) -> Response {
    answer(app, Endpoint::Completions, request)
        .await
        .unwrap_or_else(refusal)
}

async fn chat_completions(State(app): State<Arc<App>>, request: HttpRequest) -> Response {
    answer(app, Endpoint::Chat, request).await.unwrap_or_else(refusal)
}

/// An error answer. One to a body left unread (too large, or too slow) also closes the
/// connection, and says so, so that the client sends its next request on a new one.
fn refusal(error: ApiError) -> Response {
    let unread = matches!(
        error.status,
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
    );
    let mut response = error.into_response();
    if unread {
        response
            .headers_mut()
            .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    response
}

/// What every chunk or answer of one request repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    prompt_tokens: usize,
    /// The sampler's seed, drawn when the request gave none: with it the request repeats.
    seed: u64,
    /// The prompt, when the answer repeats it (`echo`).
    echo: Option<Vec<u32>>,
    /// The answer carries OpenAI's `logprobs` object.
    logprobs: bool,
    /// The folder, whose tokenizer writes a scoring answer's tokens.
    folder: Arc<ModelFolder>,
    metrics: Arc<Metrics>,
    /// Started as the request is submitted: its time to first token and between tokens.
    clock: Clock,
}

async fn answer(app: Arc<App>, endpoint: Endpoint, request: HttpRequest) -> Result<Response, ApiError> {
    if app.draining.load(Ordering::Acquire) {
        return Err(ApiError::with(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    if !app.engine.alive() {
        return Err(engine_stopped());
    }
    let body = read_body(request, app.input.body_bytes()).await?;
    let parsed = api::read_request(&body)?.validate(endpoint, &app.folder, &app.defaults, &app.input)?;
    let (events, receiver) = mpsc::unbounded_channel();
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    let meta = Meta {
        id: format!(
            "{prefix}-{}-{}",
            app.started,
            app.next_id.fetch_add(1, Ordering::Relaxed)
        ),
        created: unix_seconds(),
        model: app.defaults.model_name.clone(),
        endpoint,
        prompt_tokens: parsed.row.prompt.len(),
        seed: parsed.row.decoding.sampling.seed,
        echo: parsed.echo.then(|| parsed.row.prompt.clone()),
        logprobs: parsed.scoring.is_some(),
        folder: app.folder.clone(),
        metrics: app.metrics.clone(),
        clock: Clock::start(),
    };
    let job = Job {
        row: parsed.row,
        config: parsed.config,
        diffusion: parsed.diffusion,
        stop_strings: parsed.stop_strings,
        scoring: parsed.scoring,
        events,
    };
    app.engine.submit(job).map_err(|refusal| match refusal {
        Refusal::Busy => ApiError::with(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_full",
            "the server is busy (request queue full); retry later",
        ),
        Refusal::TooLarge { needed, budget } => ApiError::with(
            StatusCode::BAD_REQUEST,
            "kv_budget_exceeded",
            format!(
                "the request needs {needed} bytes of KV cache, more than the server's budget of {budget}; \
                 ask for fewer tokens or steps, or a compressing cache_strategy"
            ),
        ),
        Refusal::Stopped => engine_stopped(),
    })?;
    app.metrics.admitted(meta.prompt_tokens);
    if parsed.stream {
        Ok(Sse::new(stream(meta, receiver, parsed.include_usage))
            .keep_alive(KeepAlive::default())
            .into_response())
    } else {
        whole(meta, receiver).await
    }
}

/// Token counts and the recurrence spent on them.
fn usage(prompt_tokens: usize, steps_per_token: &[usize]) -> Value {
    let completion = steps_per_token.len();
    let mean = steps_per_token.iter().sum::<usize>() as f64 / completion.max(1) as f64;
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "mean_steps_per_token": mean,
        "max_steps_per_token": steps_per_token.iter().copied().max().unwrap_or(0),
    })
}

/// The request's body, at most `limit` bytes: refused unread when its length says it is over,
/// and cut off at `limit` when it does not say; and refused when it has not all arrived within
/// the connection's body timeout.
async fn read_body(request: HttpRequest, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::with(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is over {limit} bytes, more than a request within the model's context needs"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let timeout = request.extensions().get::<BodyTimeout>().map(|t| t.0);
    let mut body = request.into_body().into_data_stream();
    if declared.is_some_and(|length| length > limit as u64) {
        drain(body, timeout);
        return Err(too_large());
    }
    let read = async {
        let mut read = Vec::with_capacity(declared.map_or(0, |length| length as usize));
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::with(
                    StatusCode::BAD_REQUEST,
                    "unreadable_body",
                    format!("cannot read the request body: {e}"),
                )
            })?;
            if read.len() + chunk.len() > limit {
                return Err(too_large());
            }
            read.extend_from_slice(&chunk);
        }
        Ok(read)
    };
    let read = match timeout {
        None => read.await,
        Some(timeout) => tokio::time::timeout(timeout, read).await.unwrap_or_else(|_| {
            Err(ApiError::with(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s of its headers",
                    timeout.as_secs_f64()
                ),
            ))
        }),
    };
    match read {
        Ok(read) => Ok(read.into()),
        Err(error) => {
            if error.status == StatusCode::PAYLOAD_TOO_LARGE {
                drain(body, timeout);
            }
            Err(error)
        }
    }
}

/// Most bytes, and time, spent reading a refused body to its end.
const DRAIN_BYTES: usize = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// Reads a refused body to its end and drops it, within bounds (the body timeout, when the
/// connection has one): most clients send the whole body before they read the answer, and a
/// connection closed with bytes unread is reset, so they would see the reset rather than the
/// 413.
fn drain(mut body: BodyDataStream, timeout: Option<Duration>) {
    let time = timeout.map_or(DRAIN_TIME, |t| t.min(DRAIN_TIME));
    tokio::spawn(tokio::time::timeout(time, async move {
        let mut read = 0;
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.len();
            if read > DRAIN_BYTES {
                break;
            }
        }
    }));
}

/// The engine thread has ended: nothing can be answered until the server restarts.
fn engine_stopped() -> ApiError {
    ApiError::with(
        StatusCode::SERVICE_UNAVAILABLE,
        "engine_stopped",
        "the server's engine has stopped (see the server's log); it cannot answer until restarted",
    )
}

fn engine_gone() -> ApiError {
    ApiError::with(
        StatusCode::INTERNAL_SERVER_ERROR,
        "engine_stopped",
        "the engine stopped before the answer was complete",
    )
}

/// The whole answer at once.
async fn whole(mut meta: Meta, mut events: mpsc::UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut prompt_scores = Vec::new();
    let mut scores = Vec::new();
    loop {
        match events.recv().await.ok_or_else(engine_gone)? {
            Event::Token {
                id,
                text: piece,
                score,
                steps,
            } => {
                meta.clock.token(&meta.metrics, steps);
                text += &piece;
                ids.push(id);
                scores.extend(score);
            }
            Event::Scored { prompt } => prompt_scores = prompt,
            Event::Failed(reason) => {
                meta.metrics.finished(None);
                return Err(ApiError::with(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "generation_failed",
                    reason,
                ));
            }
            Event::Done {
                finish,
                tail,
                steps_per_token,
            } => {
                meta.metrics.finished(Some(finish));
                text += &tail;
                let tokenizer = meta.folder.tokenizer.as_ref();
                let logprobs = match (meta.logprobs, meta.endpoint) {
                    (false, _) => Value::Null,
                    (true, Endpoint::Completions) => {
                        let echo = meta.echo.as_deref().map(|prompt| (prompt, prompt_scores.as_slice()));
                        logprobs::completion(tokenizer, echo, &scores)
                    }
                    (true, Endpoint::Chat) => logprobs::chat(tokenizer, &scores),
                };
                if let Some(prompt) = &meta.echo {
                    text = logprobs::echoed(tokenizer, prompt, &text);
                }
                let choice = match meta.endpoint {
                    Endpoint::Completions => json!({
                        "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish.as_str(),
                        "token_ids": ids, "steps_per_token": steps_per_token,
                    }),
                    Endpoint::Chat => json!({
                        "index": 0, "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs, "finish_reason": finish.as_str(),
                        "token_ids": ids, "steps_per_token": steps_per_token,
                    }),
                };
                let object = match meta.endpoint {
                    Endpoint::Completions => "text_completion",
                    Endpoint::Chat => "chat.completion",
                };
                return Ok(axum::Json(json!({
                    "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
                    "seed": meta.seed, "choices": [choice], "usage": usage(meta.prompt_tokens, &steps_per_token),
                }))
                .into_response());
            }
        }
    }
}

/// The answer as server-sent events: one chunk per piece of text (with its token's log
/// probabilities when asked; an echoed prompt first, in a chunk of its own), a last chunk with
/// the finish reason, the usage chunk when asked for, then `[DONE]`. Dropping the stream (the
/// client went away) closes the request's channel, and the engine drops its row.
fn stream(
    meta: Meta,
    events: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let mut out = VecDeque::new();
    if meta.endpoint == Endpoint::Chat {
        out.push_back(chunk(
            &meta,
            Some(json!({"role": "assistant", "content": ""})),
            Value::Null,
            None,
            None,
        ));
    }
    let state = (meta, events, out, Pieces::default());
    futures_util::stream::unfold(state, move |(mut meta, mut events, mut out, mut pieces)| async move {
        let tokenizer = meta.folder.tokenizer.as_ref();
        while out.is_empty() && !pieces.ended {
            match events.recv().await {
                // A chunk for every token, even one whose text is held back: clients see
                // the recurrence per token, and a client that has gone is noticed at once.
                Some(Event::Token {
                    mut text, steps, score, ..
                }) => {
                    let scores = score.as_slice();
                    let logprobs = match (meta.logprobs, meta.endpoint) {
                        (false, _) => Value::Null,
                        (true, Endpoint::Completions) => pieces.logprobs.piece(tokenizer, None, scores),
                        (true, Endpoint::Chat) => logprobs::chat(tokenizer, scores),
                    };
                    // Without a tokenizer the echoed ids and the answer's are one list.
                    if pieces.echoed && pieces.tokens == 0 && tokenizer.is_none() {
                        text.insert(0, ',');
                    }
                    pieces.tokens += 1;
                    meta.clock.token(&meta.metrics, steps);
                    out.push_back(chunk(&meta, Some(text.into()), logprobs, None, Some(steps)));
                }
                Some(Event::Scored { prompt: scores }) => {
                    if let Some(prompt) = &meta.echo {
                        let logprobs = match meta.logprobs {
                            true => pieces.logprobs.piece(tokenizer, Some((prompt, &scores)), &[]),
                            false => Value::Null,
                        };
                        let text = logprobs::echoed(tokenizer, prompt, "");
                        out.push_back(chunk(&meta, Some(text.into()), logprobs, None, None));
                        pieces.echoed = true;
                    }
                }
                Some(Event::Done {
                    finish,
                    tail,
                    steps_per_token,
                }) => {
                    meta.metrics.finished(Some(finish));
                    if !tail.is_empty() {
                        out.push_back(chunk(&meta, Some(tail.into()), Value::Null, None, None));
                    }
                    out.push_back(chunk(&meta, None, Value::Null, Some(finish), None));
                    if include_usage {
                        out.push_back(usage_chunk(&meta, &steps_per_token));
                    }
                    out.push_back(SseEvent::default().data("[DONE]"));
                    pieces.ended = true;
                }
                Some(Event::Failed(reason)) => {
                    meta.metrics.finished(None);
                    let error = ApiError::with(StatusCode::INTERNAL_SERVER_ERROR, "generation_failed", reason);
                    out.push_back(SseEvent::default().data(error.body().to_string()));
                    out.push_back(SseEvent::default().data("[DONE]"));
                    pieces.ended = true;
                }
                None => {
                    out.push_back(SseEvent::default().data(engine_gone().body().to_string()));
                    pieces.ended = true;
                }
            }
        }
        let next = out.pop_front()?;
        Some((Ok(next), (meta, events, out, pieces)))
    })
}

/// Where a stream stands: tokens sent, whether the prompt was echoed, the completions
/// `logprobs` offsets, and whether the answer ended.
#[derive(Debug, Default)]
struct Pieces {
    tokens: usize,
    echoed: bool,
    logprobs: logprobs::Completion,
    ended: bool,
}

/// One streamed chunk: a text piece (or the chat's opening role) with its `logprobs`, or the
/// finish reason.
fn chunk(
    meta: &Meta,
    content: Option<Value>,
    logprobs: Value,
    finish: Option<Finish>,
    steps: Option<usize>,
) -> SseEvent {
    let finish = finish.map(Finish::as_str);
    let (object, choice) = match meta.endpoint {
        Endpoint::Completions => (
            "text_completion",
            json!({"index": 0, "text": content.unwrap_or(json!("")), "logprobs": logprobs, "finish_reason": finish, "num_steps": steps}),
        ),
        Endpoint::Chat => {
            let delta = match content {
                Some(Value::Object(delta)) => Value::Object(delta),
                Some(text) => json!({"content": text}),
                None => json!({}),
            };
            (
                "chat.completion.chunk",
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish, "num_steps": steps}),
            )
        }
    };
    let body = json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model, "seed": meta.seed,
        "choices": [choice],
    });
    SseEvent::default().data(body.to_string())
}

fn usage_chunk(meta: &Meta, steps_per_token: &[usize]) -> SseEvent {
    let object = match meta.endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    };
    let body = json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model, "seed": meta.seed,
        "choices": [], "usage": usage(meta.prompt_tokens, steps_per_token),
    });
    SseEvent::default().data(body.to_string())
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
