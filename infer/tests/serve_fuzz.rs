//! The server's request surface under generated requests: every JSON field of
//! /v1/completions and /v1/chat/completions, each sampler's knobs at their extremes and at type
//! limits, wrong types and huge arrays, sent in process through the router. Each must get a 4xx
//! JSON error or a 200 with at most the tokens it asked for, never a 5xx, within a bound; the
//! server answers normally afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use folder::ModelFolder;
use futures_util::StreamExt;
use infer::serve::api::ServerDefaults;
use infer::serve::engine::EngineLimits;
use infer::serve::{App, router};
use model::burn::prelude::Device;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value, json};
use tower::ServiceExt;

mod common;

use common::*;

const REQUESTS: usize = 5000;
/// The server's most recurrence steps: keeps the accepted requests cheap.
const MAX_STEPS: usize = 8;
/// The most a request may take, from sending to its last byte.
const BOUND: Duration = Duration::from_secs(60);

/// Numbers and values at the limits of JSON's and Rust's types.
fn extremes() -> Vec<Value> {
    vec![
        json!(0),
        json!(-1),
        json!(1),
        json!(2),
        json!(i32::MAX),
        json!(1u64 << 53),
        json!(u64::MAX),
        json!(-9.2e18),
        json!(1e300),
        json!(-1e300),
        json!(5e-324),
        json!(0.5),
        json!("NaN"),
        json!("inf"),
        json!("-Infinity"),
        json!(""),
        json!("x"),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!([1, 2, 3]),
        json!(vec![u32::MAX; 64]),
        json!(vec![7; 20_000]),
        json!(vec!["stop"; 5_000]),
        json!({"a": {"b": {"c": [1, [2, [3]]]}}}),
    ]
}

/// Values a field of this name can sensibly take, besides the extremes.
fn sensible(field: &str) -> Vec<Value> {
    match field {
        "model" => vec![json!("tiny"), json!("gpt-4")],
        "prompt" => vec![
            json!("Hello"),
            json!([1, 2, 3]),
            json!(["Hi"]),
            json!([[4, 5]]),
            json!("x".repeat(5000)),
        ],
        "messages" => vec![
            json!([{"role": "user", "content": "Hi"}]),
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]),
            json!([{"role": "robot", "content": "Hi"}]),
            json!([{"role": "user", "content": [{"type": "image", "text": "x"}]}]),
        ],
        "max_tokens" | "max_completion_tokens" => vec![json!(1), json!(3), json!(8), json!(250)],
        "temperature" => vec![json!(0), json!(0.7), json!(1.5), json!(100), json!(101)],
        "top_p" => vec![json!(0.9), json!(1.0), json!(1.01)],
        "top_k" => vec![json!(1), json!(40), json!(262), json!(263)],
        "min_p" => vec![json!(0.05), json!(1.0)],
        "repetition_penalty" => vec![json!(1.1), json!(0.5)],
        "seed" => vec![json!(7), json!(u64::MAX)],
        "stop" => vec![json!("\n"), json!(["a", "b"]), json!([""])],
        "stop_token_ids" => vec![json!([257]), json!([262])],
        "stream" => vec![json!(true), json!(false)],
        "stream_options" => vec![json!({"include_usage": true}), json!({"include_usage": 3})],
        "n" => vec![json!(1), json!(2)],
        "presence_penalty" | "frequency_penalty" => vec![json!(0), json!(0.5)],
        "logprobs" => vec![json!(false), json!(5)],
        "echo" => vec![json!(false), json!(true)],
        "user" => vec![json!("someone")],
        "num_steps" => vec![json!(1), json!(MAX_STEPS), json!(MAX_STEPS + 1)],
        "exit_criterion" => [
            "none",
            "kl",
            "minp-kl",
            "entropy-diff",
            "latent-diff",
            "cosine",
            "argmax-stability",
            "soon",
        ]
        .map(|c| json!(c))
        .to_vec(),
        "exit_threshold" => vec![json!(0), json!(1e-9), json!(0.5), json!(1e9)],
        "cache_strategy" => [
            "full",
            "latest-m4",
            "available-m4",
            "always-last-m4",
            "latest-m4-compress-s4",
            "always-last-m4-compress-anchor",
            "skip",
            "latest",
        ]
        .map(|c| json!(c))
        .to_vec(),
        "warm_start" => ["cold", "raw", "normalized", "hot"].map(|c| json!(c)).to_vec(),
        "sampler" => vec![json!("sequential"), json!("diffusion"), json!("wave")],
        "headway" => vec![json!(1), json!(4), json!(254), json!(255)],
        "inner_recurrence" => vec![json!(1), json!(4), json!(MAX_STEPS + 1)],
        "ema_embeds" | "state_noise_mixing" => vec![json!(0), json!(0.5), json!(1), json!(1.5)],
        "dampened_state_mixer" | "sqrt_mixer" | "full_prefill" => vec![json!(true), json!(false)],
        "freeze_strategy" => [
            "latent-diff",
            "latent-acceleration-1",
            "latent-acceleration-2",
            "token-stability",
            "fixed",
            "x",
        ]
        .map(|c| json!(c))
        .to_vec(),
        "exit_t" => vec![json!(0), json!(0.03), json!(10)],
        "max_wavefront" => vec![json!(0), json!(1), json!(2), json!(16)],
        "max_diffusion_steps" => vec![json!(1), json!(16), json!(64)],
        "init_scale" => vec![json!(0), json!(1), json!(1e6)],
        _ => vec![],
    }
}

const FIELDS: [&str; 28] = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "stream",
    "stream_options",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "echo",
    "user",
    "num_steps",
    "exit_criterion",
    "exit_threshold",
    "cache_strategy",
    "warm_start",
    "sampler",
    "diffusion",
];

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

/// A value for `field`: sensible most of the time, an extreme otherwise.
fn value(rng: &mut ChaCha8Rng, field: &str) -> Value {
    let sensible = sensible(field);
    if !sensible.is_empty() && rng.random_bool(0.7) {
        sensible.choose(rng).unwrap().clone()
    } else {
        extremes().choose(rng).unwrap().clone()
    }
}

/// One request: a valid one with a few fields set to generated values (now and then a body
/// that is not an object at all).
fn request(rng: &mut ChaCha8Rng) -> (&'static str, Value) {
    let chat = rng.random_bool(0.4);
    let path = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    if rng.random_bool(0.02) {
        return (path, extremes().choose(rng).unwrap().clone());
    }
    let mut body = Map::new();
    if chat {
        body.insert("messages".into(), json!([{"role": "user", "content": "Hi"}]));
    } else {
        body.insert("prompt".into(), json!([1, 2, 3]));
    }
    body.insert("max_tokens".into(), json!(rng.random_range(1..=6)));
    if rng.random_bool(0.15) {
        body.insert("sampler".into(), json!("diffusion"));
    }
    for _ in 0..rng.random_range(1..=3) {
        let field = *FIELDS.choose(rng).unwrap();
        let value = if field == "diffusion" && rng.random_bool(0.8) {
            let mut knobs = Map::new();
            for _ in 0..rng.random_range(0..=3) {
                let knob = *KNOBS.choose(rng).unwrap();
                knobs.insert(knob.into(), value(rng, knob));
            }
            if rng.random_bool(0.05) {
                knobs.insert("wave".into(), json!(1));
            }
            Value::Object(knobs)
        } else {
            value(rng, field)
        };
        body.insert(field.into(), value);
    }
    if rng.random_bool(0.05) {
        body.insert("nonsense".into(), json!(1));
    }
    let diffusion = body.get("sampler") == Some(&json!("diffusion"));
    if diffusion {
        // The engine runs a diffusion request for up to `max_diffusion_steps` waves (4096 by
        // default) when its states never settle; that bound is the sampler's, so here the
        // accepted values stay small (the extremes above are all refused on parsing).
        let knobs = body.entry("diffusion").or_insert_with(|| json!({}));
        if let Value::Object(knobs) = knobs {
            let steps = knobs.entry("max_diffusion_steps").or_insert(json!(32));
            if steps.as_u64().is_some_and(|s| (65..=1 << 20).contains(&s)) {
                *steps = json!(32);
            }
        }
    }
    (
        if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        },
        Value::Object(body),
    )
}

/// The tokens a request may get back: its `max_tokens`, or the context.
fn most_tokens(body: &Value) -> usize {
    body.get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map_or(256, |n| n as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_get_a_4xx_or_a_bounded_answer_and_the_server_lives() {
    let dir = folder(DEFAULT_IDS);
    let folder = ModelFolder::open(dir.path(), &Device::flex()).unwrap();
    let defaults = ServerDefaults {
        model_name: "tiny".into(),
        num_steps: 2,
        max_num_steps: MAX_STEPS,
    };
    let limits = EngineLimits {
        max_batch: 8,
        queue_capacity: 4096,
        kv_budget_bytes: 64 << 20,
        prefill_window: EngineLimits::PREFILL_WINDOW,
        exit_wait: EngineLimits::EXIT_WAIT,
    };
    let app = Arc::new(App::new(folder, defaults, limits, None));
    let routes = router(app.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let requests: Vec<_> = (0..REQUESTS).map(|_| request(&mut rng)).collect();
    let started = Instant::now();
    let answers = futures_util::stream::iter(requests)
        .map(|(path, body)| {
            let routes = routes.clone();
            async move {
                let http = Request::post(path)
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap();
                let answer = tokio::time::timeout(BOUND, async {
                    let response = routes.oneshot(http).await.unwrap();
                    let status = response.status();
                    let bytes = axum::body::to_bytes(response.into_body(), 64 << 20).await.unwrap();
                    (status, String::from_utf8(bytes.to_vec()).unwrap())
                })
                .await;
                (path, body, answer)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let (mut refused, mut answered, mut waves) = (0, 0, 0);
    for (path, body, answer) in answers {
        let Ok((status, text)) = answer else {
            panic!("{path} {body}: no answer within {BOUND:?}");
        };
        let shown = format!("{path} {body}: {status} {text}");
        assert!(!status.is_server_error(), "{shown}");
        if status.is_client_error() {
            let error: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {shown}"));
            assert!(
                error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{shown}"
            );
            refused += 1;
            continue;
        }
        assert_eq!(status, StatusCode::OK, "{shown}");
        answered += 1;
        waves += usize::from(body["sampler"] == json!("diffusion"));
        let tokens = if body["stream"] == json!(true) {
            let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            assert_eq!(events.last(), Some(&"[DONE]"), "{shown}");
            let mut tokens = 0;
            for event in &events[..events.len() - 1] {
                let chunk: Value = serde_json::from_str(event).unwrap_or_else(|_| panic!("{shown}"));
                assert!(chunk.get("error").is_none(), "{shown}");
                tokens += usize::from(!chunk["choices"][0]["num_steps"].is_null());
            }
            tokens
        } else {
            let answer: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {shown}"));
            let tokens = answer["usage"]["completion_tokens"].as_u64();
            tokens.unwrap_or_else(|| panic!("no token count: {shown}")) as usize
        };
        assert!(tokens <= most_tokens(&body), "{tokens} tokens: {shown}");
    }
    eprintln!(
        "{REQUESTS} requests in {:.1} s: {refused} refused, {answered} answered ({waves} by the diffusion sampler)",
        started.elapsed().as_secs_f64()
    );
    // Both outcomes, and both samplers, are well represented.
    assert!(
        refused > REQUESTS / 4 && answered > REQUESTS / 10 && waves > 20,
        "{refused} refused, {answered} answered, {waves} by diffusion"
    );
    // Still serving.
    let health = routes
        .clone()
        .oneshot(Request::get("/health").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let normal = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(json!({"prompt": "Hi", "max_tokens": 2}).to_string()))
        .unwrap();
    assert_eq!(routes.oneshot(normal).await.unwrap().status(), StatusCode::OK);
    let since = Instant::now();
    while app.engine_load() != (0, 0) {
        assert!(
            since.elapsed() < BOUND,
            "{:?} still queued and running",
            app.engine_load()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
