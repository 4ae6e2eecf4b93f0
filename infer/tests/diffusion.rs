//! The wavefront sampler against the authors' code beyond the shipped fixtures: every knob's
//! runs, recorded with the reference on tiny-d's model (tests/data/diffusion-tiny-d.json, made
//! by scripts/diffusion-reference-runs.py), must come out token for token, with the same core
//! steps between samplings and the same sampled logits.

use std::path::Path;

use infer::fixture_report::check_runs;
use model::burn::prelude::Device;
use model::fixture::Fixture;

#[test]
fn every_knob_reproduces_the_reference() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fixture = Fixture::open(root.join("fixtures/reference/tiny-d"), &Device::flex()).unwrap();
    let (checks, unsupported) = check_runs(&fixture, &root.join("infer/tests/data/diffusion-tiny-d.json")).unwrap();
    assert!(unsupported.is_empty(), "not reproduced: {unsupported:?}");
    let failed: Vec<String> = checks.iter().filter(|c| !c.passed).map(|c| c.to_string()).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // Thirteen settings, each with tokens and steps (and sampled values when robust).
    assert!(checks.len() >= 13 * 2, "{} checks", checks.len());
}

use std::ops::ControlFlow;

use infer::adaptive::Decoding;
use infer::diffusion::{self, DiffusionConfig, DiffusionError, Freeze};
use infer::greedy;
use infer::strategy::Strategy;
use infer::warm_start::WarmStart;
use model::HuginnConfig;

fn tiny_d() -> Fixture {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Fixture::open(root.join("fixtures/reference/tiny-d"), &Device::flex()).unwrap()
}

const PROMPT: [u32; 6] = [19, 83, 10, 3, 53, 102];

fn zero_init() -> DiffusionConfig {
    DiffusionConfig {
        num_steps: 8,
        init_scale: 0.0,
        ..DiffusionConfig::default()
    }
}

fn run(model: &model::Huginn, config: &DiffusionConfig, decoding: &Decoding) -> diffusion::DiffusionGeneration {
    diffusion::generate(model, &PROMPT, 12, config, decoding, |_| ControlFlow::Continue(())).unwrap()
}

/// The reference's comment names `max_wavefront = 1` with `inner_recurrence = num_steps` as the
/// setting where the sampler equals plain decoding; measured on the reference, a wave of one
/// position never freezes (61 waves, one token). Two positions is the smallest wave that
/// moves; there, on tiny-d, the reference and this build both give plain greedy's tokens.
#[test]
fn a_two_position_wave_at_full_depth_gives_plain_greedy_tokens() {
    let fixture = tiny_d();
    let config = DiffusionConfig {
        inner_recurrence: 8,
        max_wavefront: 2,
        ema_embeds: 0.0,
        state_noise_mixing: 0.0,
        strategy: Strategy::default(),
        ..zero_init()
    };
    let wave = run(&fixture.model, &config, &Decoding::default());
    let plain = greedy::generate(&fixture.model, &PROMPT, 12, 8, WarmStart::Cold).unwrap();
    assert_eq!(wave.tokens, plain.tokens);
    assert!(wave.stats.standing_waves > 0, "{:?}", wave.stats);
    let one = DiffusionConfig {
        max_wavefront: 1,
        ..config
    };
    let err = diffusion::generate(&fixture.model, &PROMPT, 12, &one, &Decoding::default(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(err.to_string().contains("never freezes"), "{err}");
}

/// Upstream resamples prompt positions when the prompt is the first wave and a freeze lands
/// inside it (recorded in tests/data: the reference turns the prompt 19, 83, 10, 3, 53, 102 into
/// 19, 83, 10, 3, 31, 9 and continues 34, 27, 7, …). Here the prompt stays, and on tiny-d the
/// continuation is then plain greedy's.
#[test]
fn the_prompt_as_first_wave_is_never_edited() {
    let fixture = tiny_d();
    let config = DiffusionConfig {
        full_prefill: false,
        ..zero_init()
    };
    let out = run(&fixture.model, &config, &Decoding::default());
    let plain = greedy::generate(&fixture.model, &PROMPT, 12, 8, WarmStart::Cold).unwrap();
    assert_eq!(out.tokens[..12], plain.tokens[..]);
    assert_eq!(
        out.steps_between_samplings[0], 4,
        "the first sampling follows the first wave"
    );
}

/// Upstream draws the guessed tokens of headway > 1 from 0..65510 and so indexes past any smaller
/// vocabulary; here they come from the model's own, and the wave moves several positions at once.
#[test]
fn a_wider_headway_works_on_a_small_vocabulary() {
    let fixture = tiny_d();
    for freeze in [Freeze::LatentDiff, Freeze::Fixed, Freeze::TokenStability] {
        let config = DiffusionConfig {
            headway: 3,
            freeze,
            ..zero_init()
        };
        let mut streamed = vec![];
        let out = diffusion::generate(&fixture.model, &PROMPT, 12, &config, &Decoding::default(), |block| {
            streamed.extend_from_slice(block);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert!(out.tokens.len() >= 12, "{freeze}: {:?}", out.tokens);
        assert!(out.tokens.iter().all(|&t| t < 128), "{freeze}: {:?}", out.tokens);
        assert_eq!(streamed, out.tokens, "{freeze}: the stream is the result");
    }
}

/// A stop token ends the run when it freezes and is the last token returned; the caller may
/// end it too (a client that left).
#[test]
fn a_stop_token_or_the_caller_ends_the_run() {
    let fixture = tiny_d();
    let all = run(&fixture.model, &zero_init(), &Decoding::default());
    let stop = all.tokens[3];
    let decoding = Decoding {
        stop_tokens: vec![stop],
        ..Decoding::default()
    };
    let stopped = run(&fixture.model, &zero_init(), &decoding);
    let at = all.tokens.iter().position(|&t| t == stop).unwrap();
    assert_eq!(stopped.tokens, all.tokens[..=at]);
    assert!(stopped.stats.stopped);
    let mut calls = 0;
    let out = diffusion::generate(&fixture.model, &PROMPT, 12, &zero_init(), &Decoding::default(), |_| {
        calls += 1;
        ControlFlow::Break(())
    })
    .unwrap();
    assert_eq!((calls, out.tokens.len()), (1, 1), "ends after the prompt's token");
}

/// Settings a user can get wrong are one-line errors before any work; so is a prompt that
/// leaves no room.
#[test]
fn bad_settings_are_refused_before_any_work() {
    let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&Device::flex(), 3);
    let cases: Vec<(DiffusionConfig, &str)> = vec![
        (
            DiffusionConfig {
                headway: 0,
                ..zero_init()
            },
            "headway",
        ),
        (
            DiffusionConfig {
                inner_recurrence: 0,
                ..zero_init()
            },
            "inner_recurrence",
        ),
        (
            DiffusionConfig {
                max_wavefront: 1,
                ..zero_init()
            },
            "max_wavefront",
        ),
        (
            DiffusionConfig {
                num_steps: 0,
                ..zero_init()
            },
            "num_steps",
        ),
        (
            DiffusionConfig {
                max_diffusion_steps: 0,
                ..zero_init()
            },
            "max_diffusion_steps",
        ),
        (
            DiffusionConfig {
                ema_embeds: 1.5,
                ..zero_init()
            },
            "ema_embeds",
        ),
        (
            DiffusionConfig {
                state_noise_mixing: -0.1,
                ..zero_init()
            },
            "state_noise_mixing",
        ),
        (
            DiffusionConfig {
                exit_t: f64::NAN,
                ..zero_init()
            },
            "exit_t",
        ),
        (
            DiffusionConfig {
                init_scale: f64::INFINITY,
                ..zero_init()
            },
            "init_scale",
        ),
    ];
    for (config, field) in cases {
        let err = diffusion::generate(&model, &[1, 2, 3], 4, &config, &Decoding::default(), |_| {
            panic!("no work may start")
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, DiffusionError::Range(ref r) if r.name == field),
            "{field}: {text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }
    let long = vec![1; model.config().block_size];
    let err = diffusion::generate(&model, &long, 4, &zero_init(), &Decoding::default(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(err, DiffusionError::Input(_)), "{err}");
    assert!("sideways".parse::<Freeze>().unwrap_err().contains("latent-diff"));
}

/// Knobs beyond what the model and the request allow are refused by name before anything is
/// allocated: a headway past the context (2^31 once claimed 549 GB, 2^64 − 1 overflowed),
/// `max_new` past it, and the rest at their type's limits.
#[test]
fn knobs_beyond_the_model_are_refused_before_any_allocation() {
    let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&Device::flex(), 3);
    let prompt = [1, 2, 3];
    let refused = |config: DiffusionConfig, max_new: usize| {
        let started = std::time::Instant::now();
        let err = diffusion::generate(&model, &prompt, max_new, &config, &Decoding::default(), |_| {
            panic!("no work may start")
        })
        .unwrap_err();
        assert!(started.elapsed().as_secs() < 5, "{err}");
        assert!(!err.to_string().contains('\n'), "{err}");
        match err {
            DiffusionError::Range(range) => range.name,
            other => panic!("{other}"),
        }
    };
    for headway in [254, 2147483647, usize::MAX] {
        let name = refused(DiffusionConfig { headway, ..zero_init() }, 4);
        assert_eq!(name, "headway", "{headway}");
    }
    assert_eq!(refused(zero_init(), 254), "max_new_tokens");
    assert_eq!(refused(zero_init(), usize::MAX), "max_new_tokens");
    assert_eq!(refused(zero_init(), 0), "max_new_tokens");
    let huge = [
        (
            DiffusionConfig {
                inner_recurrence: usize::MAX,
                ..zero_init()
            },
            "inner_recurrence",
        ),
        (
            DiffusionConfig {
                num_steps: 1 << 40,
                ..zero_init()
            },
            "num_steps",
        ),
        (
            DiffusionConfig {
                max_diffusion_steps: usize::MAX,
                ..zero_init()
            },
            "max_diffusion_steps",
        ),
        (
            DiffusionConfig {
                exit_t: 1e300,
                ..zero_init()
            },
            "exit_t",
        ),
        (
            DiffusionConfig {
                init_scale: 1e9,
                ..zero_init()
            },
            "init_scale",
        ),
    ];
    for (config, field) in huge {
        assert_eq!(refused(config, 4), field);
    }
    // The widest headway the context allows runs, and so does an unbounded wavefront.
    let widest = DiffusionConfig {
        headway: 256 - prompt.len(),
        max_wavefront: usize::MAX,
        max_diffusion_steps: 3,
        ..zero_init()
    };
    let out = diffusion::generate(&model, &prompt, 4, &widest, &Decoding::default(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(!out.tokens.is_empty());
    // The memory bound counts the whole context at most, and never overflows.
    let shape = model.config();
    let bytes = widest.memory_bytes(shape, prompt.len(), 4, 4).unwrap();
    assert!(bytes < 64 << 20, "{bytes}");
    let absurd = DiffusionConfig {
        headway: usize::MAX,
        ..zero_init()
    };
    assert_eq!(absurd.memory_bytes(shape, prompt.len(), 4, 4), None);
}

/// After the prompt's pass and after every wave the caller is asked whether to go on, also
/// when the wave froze nothing: a run that never converges can be ended by its caller.
#[test]
fn the_caller_is_asked_after_every_wave() {
    let model = HuginnConfig::tiny(64, 32, 4, (1, 2, 1)).init(&Device::flex(), 3);
    // exit_t 0: no latent change is below it, so no position ever freezes.
    let stuck = DiffusionConfig {
        exit_t: 0.0,
        max_wavefront: 8,
        max_diffusion_steps: 50,
        ..zero_init()
    };
    let mut calls = 0;
    let out = diffusion::generate(&model, &[1, 2, 3], 4, &stuck, &Decoding::default(), |_| {
        calls += 1;
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(out.tokens.len(), 1, "only the prompt pass's token");
    assert_eq!(calls, 1 + out.stats.diffusion_steps);
    assert_eq!(out.stats.diffusion_steps, 50);
    let mut calls = 0;
    let out = diffusion::generate(&model, &[1, 2, 3], 4, &stuck, &Decoding::default(), |_| {
        calls += 1;
        if calls == 6 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(out.stats.diffusion_steps, 5, "ended after the fifth wave");
}

mod common;

use std::time::{Duration, Instant};

use folder::ModelFolder;
use infer::serve::api::ServerDefaults;
use infer::serve::engine::EngineLimits;
use infer::serve::{App, ConnectionLimits, serve};
use serde_json::{Value, json};

/// A server for the test folder on a free loopback port; stops when the test's runtime ends.
async fn start_server(dir: &Path) -> (String, std::sync::Arc<App>) {
    let folder = ModelFolder::open(dir, &Device::flex()).unwrap();
    let defaults = ServerDefaults {
        model_name: "tiny".into(),
        num_steps: common::STEPS,
        max_num_steps: 64,
    };
    let limits = EngineLimits {
        max_batch: 8,
        queue_capacity: 64,
        kv_budget_bytes: 1 << 30,
        prefill_window: EngineLimits::PREFILL_WINDOW,
        exit_wait: EngineLimits::EXIT_WAIT,
    };
    let app = std::sync::Arc::new(App::new(folder, defaults, limits, None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(
        listener,
        app.clone(),
        std::future::pending(),
        ConnectionLimits {
            shutdown_grace: Duration::from_secs(1),
            ..ConnectionLimits::default()
        },
    ));
    (url, app)
}

async fn complete(url: &str, body: Value) -> (reqwest::StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .timeout(Duration::from_secs(60))
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

/// A request that never converges (`exit_t: 0` freezes nothing; a million waves allowed) is
/// stopped within a wave of its client leaving: the next request is answered at once, not
/// after the million waves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diffusion_request_whose_client_left_stops_at_the_next_wave() {
    let dir = common::folder(common::DEFAULT_IDS);
    let (url, app) = start_server(dir.path()).await;
    let stuck = json!({"prompt": [1, 2, 3], "max_tokens": 4, "sampler": "diffusion",
        "diffusion": {"exit_t": 0.0, "max_wavefront": 8, "max_diffusion_steps": 1 << 20}});
    let body = stuck.to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let client = tokio::net::TcpStream::connect(url.strip_prefix("http://").unwrap())
        .await
        .unwrap();
    let mut bytes = request.as_bytes();
    while !bytes.is_empty() {
        client.writable().await.unwrap();
        match client.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    let sent = Instant::now();
    while app.engine_load().1 == 0 {
        assert!(sent.elapsed() < Duration::from_secs(30), "the request never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let it run some waves, then leave.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(client);
    let left = Instant::now();
    let (status, answer) = complete(&url, json!({"prompt": [1, 2, 3], "max_tokens": 2})).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{answer}");
    assert!(
        left.elapsed() < Duration::from_secs(20),
        "answered {:?} after the client left",
        left.elapsed()
    );
}

/// The finish reason says why a diffusion answer ended: `length` at `max_tokens`, and
/// `not_converged` when `max_diffusion_steps` waves ran before that many tokens froze (it was
/// `length` for both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diffusion_answer_that_did_not_converge_says_so() {
    let dir = common::folder(common::DEFAULT_IDS);
    let (url, _app) = start_server(dir.path()).await;
    let request = |diffusion: Value| {
        json!({"prompt": [1, 2, 3], "max_tokens": 4, "sampler": "diffusion", "stop_token_ids": [],
            "diffusion": diffusion})
    };
    let (status, stuck) = complete(&url, request(json!({"exit_t": 0.0, "max_diffusion_steps": 3}))).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{stuck}");
    assert_eq!(stuck["choices"][0]["finish_reason"], "not_converged", "{stuck}");
    assert!(stuck["usage"]["completion_tokens"].as_u64().unwrap() < 4, "{stuck}");
    let (status, fixed) = complete(&url, request(json!({"freeze_strategy": "fixed", "init_scale": 0.0}))).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{fixed}");
    let finish = &fixed["choices"][0]["finish_reason"];
    let tokens = fixed["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((finish == "length" && tokens == 4) || finish == "stop", "{fixed}");
}

/// The request: a headway of 2^31 − 1 (or 2^64 − 1) is refused at once with an error
/// that names it, instead of 56 s of work and an abort on a 549 GB allocation (or an overflow),
/// and the server goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headway_past_the_context_is_refused_and_the_server_lives() {
    let dir = common::folder(common::DEFAULT_IDS);
    let (url, _app) = start_server(dir.path()).await;
    for headway in [json!(2147483647u64), json!(u64::MAX)] {
        let started = Instant::now();
        let (status, answer) = complete(
            &url,
            json!({"prompt": [1, 2], "max_tokens": 4, "sampler": "diffusion", "diffusion": {"headway": headway}}),
        )
        .await;
        assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["error"]["param"], "diffusion.headway", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("headway` must be in 1..="), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }
    let (status, answer) = complete(&url, json!({"prompt": [1, 2, 3], "max_tokens": 2})).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{answer}");
}
