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
use infer::greedy::{self, WarmStart};
use infer::strategy::Strategy;
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
            matches!(err, DiffusionError::Config(_)) && text.contains(field),
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
