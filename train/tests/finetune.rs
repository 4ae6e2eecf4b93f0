//! Fine-tuning (`--init-from`, `--task chat`): a fixture model with Huginn's chat template and a
//! model trained here, on tiny chat files. The labels hold the assistant's tokens only, the loss
//! on them falls, the result opens in `huginn generate` and answers in the trained format, and
//! a fine-tuned run resumes bit-exactly.

#[path = "../../infer/tests/common/fixture.rs"]
mod common;
#[path = "../../infer/tests/common/hub_server.rs"]
mod hub_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::prelude::*;
use common::{DEFAULT_IDS, folder};
use folder::ModelFolder;
use folder::chat::{Message, Role};
use hub_server::Hub;
use infer::adaptive::{self, AdaptiveConfig, Decoding};
use infer::strategy::Strategy;
use infer::warm_start::WarmStart;
use model::HuginnConfig;
use train::chat_data::ChatFormat;
use train::data::{DataConfig, Dataset};
use train::depth::DepthScheme;
use train::metrics::{self, MetricsLog, Record};
use train::run::{OptimizerConfig, RunConfig, Trainer};
use train::schedule::Schedule;

/// The reply every record of the chat file has: a format to learn.
const ANSWER: &str = "Sure: OK.";

/// Question/answer records (`q`, `a`).
fn pairs_file(dir: &Path) -> PathBuf {
    let path = dir.join("chat.jsonl");
    let lines: Vec<String> = (0..8)
        .map(|i| serde_json::json!({"q": format!("What is {i}+{}?", 9 - i), "a": ANSWER}).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_huginn-train"))
        .args(args)
        .arg("--quiet")
        .output()
        .unwrap()
}

fn losses(dir: &Path) -> Vec<f64> {
    metrics::read(&MetricsLog::jsonl_path(dir))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Train { loss, .. } => Some(loss),
            _ => None,
        })
        .collect()
}

/// What `huginn generate --model DIR --chat --prompt QUESTION` answers: greedy, at the
/// model's mean depth, ending on its stop tokens.
fn answer(dir: &Path, question: &str, max_new: usize) -> String {
    let folder = ModelFolder::open(dir, &Device::flex()).unwrap();
    let prompt = folder.encode_chat(&[Message::new(Role::User, question)]).unwrap();
    let decoding = Decoding {
        stop_tokens: folder.stop_tokens.clone(),
        ..Default::default()
    };
    let config = AdaptiveConfig::fixed(
        folder.model.config().mean_recurrence,
        WarmStart::Cold,
        Strategy::default(),
    );
    let out = adaptive::generate_batch_with(&folder.model, &[prompt], max_new, config, &decoding).unwrap();
    folder.tokenizer.as_ref().unwrap().decode(&out[0].tokens, true).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_labels_are_the_assistants_tokens_only() {
    let model = folder(DEFAULT_IDS);
    let files = tempfile::tempdir().unwrap();
    let messages = files.path().join("messages.jsonl");
    let record = serde_json::json!({"conversation": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]});
    std::fs::write(&messages, record.to_string()).unwrap();
    for (file, format, expected) in [
        (
            pairs_file(files.path()),
            ChatFormat::Pair {
                question: "q".into(),
                answer: "a".into(),
            },
            format!("{ANSWER}<|end_turn|>"),
        ),
        (
            messages,
            ChatFormat::Messages {
                field: "conversation".into(),
            },
            "Hello.<|end_turn|>Bye!<|end_turn|>".to_string(),
        ),
    ] {
        let config = DataConfig::Chat {
            file,
            format,
            folder: model.path().to_path_buf(),
        };
        let data = Dataset::new(&config, None).unwrap();
        let tokenizer = data.tokenizer().unwrap();
        let batch = data.train_batch(0, 3, 4, &Device::flex());
        let [rows, width] = batch.labels.dims();
        let labels = batch.labels.to_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        for row in labels.chunks(width).take(rows) {
            let scored: Vec<u32> = row.iter().filter(|&&l| l != -100).map(|&l| l as u32).collect();
            assert_eq!(tokenizer.decode(&scored, false).unwrap(), expected);
        }
    }
}

#[test]
fn a_fine_tuned_fixture_model_answers_in_the_trained_format() {
    let model = folder(DEFAULT_IDS);
    let work = tempfile::tempdir().unwrap();
    let data = pairs_file(work.path());
    let out = work.path().join("run");
    let flags = "--task chat --question-field q --answer-field a --steps 40 --batch-size 8 --lr 1e-2 --warmup 2 \
                 --eval-every 20 --eval-rows 8 --checkpoint-every 20";
    let mut args: Vec<&str> = flags.split_whitespace().collect();
    args.extend([
        "--init-from",
        model.path().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    args.extend(["--out", out.to_str().unwrap()]);
    let run = train(&args);
    assert!(run.status.success(), "{}", stderr(&run));

    let losses = losses(&out);
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < first / 10.0, "the answer's loss falls: {first} → {last}");
    // The fine-tuned folder keeps the shape, the template and the special tokens.
    let final_dir = out.join("final");
    let config = HuginnConfig::from_file(final_dir.join("config.json")).unwrap();
    assert_eq!(
        config,
        HuginnConfig::from_file(model.path().join("config.json")).unwrap()
    );
    for file in ["tokenizer_config.json", "generation_config.json"] {
        assert_eq!(
            std::fs::read(final_dir.join(file)).unwrap(),
            std::fs::read(model.path().join(file)).unwrap(),
            "{file}"
        );
    }
    assert_eq!(answer(&final_dir, "What is 4+4?", 12), ANSWER);
    assert_ne!(answer(model.path(), "What is 4+4?", 12), ANSWER);
}

#[test]
fn a_fine_tuned_run_resumes_bit_exactly() {
    let model = folder(DEFAULT_IDS);
    let work = tempfile::tempdir().unwrap();
    let config = RunConfig {
        model: HuginnConfig::from_file(model.path().join("config.json")).unwrap(),
        data: DataConfig::Chat {
            file: pairs_file(work.path()),
            format: ChatFormat::Pair {
                question: "q".into(),
                answer: "a".into(),
            },
            folder: model.path().to_path_buf(),
        },
        seed: 2,
        steps: 6,
        batch_size: 2,
        accumulation: 1,
        depth: DepthScheme::PoissonLognormalFilling { mean: 3, backprop: 2 },
        optimizer: OptimizerConfig::EllisAdam {
            beta_1: 0.9,
            beta_2: 0.95,
            weight_decay: 0.0,
            update_clipping: true,
        },
        schedule: Schedule::Constant {
            peak_lr: 1e-3,
            warmup: 1,
        },
        max_grad_norm: Some(1.0),
        eval_every: 3,
        eval_rows: 2,
        eval_depths: vec![2],
        checkpoint_every: 2,
        keep_checkpoints: 2,
        devices: Vec::new(),
        init_from: Some(model.path().to_path_buf()),
    };
    let device = Device::flex().autodiff();
    let straight = work.path().join("straight");
    Trainer::create(&straight, config.clone(), &device)
        .unwrap()
        .run(None, false)
        .unwrap();
    let split = work.path().join("split");
    Trainer::create(&split, config.clone(), &device)
        .unwrap()
        .run(Some(3), false)
        .unwrap();
    let mut resumed = Trainer::resume(&split, &device).unwrap();
    assert_eq!(resumed.state().step, 3);
    resumed.run(None, false).unwrap();
    assert_eq!(losses(&split), losses(&straight));
    assert_eq!(
        std::fs::read(split.join("final/model.safetensors")).unwrap(),
        std::fs::read(straight.join("final/model.safetensors")).unwrap()
    );

    // A model section that contradicts the folder is refused before anything is written.
    let mut wrong = config;
    let mlp = wrong.model.intermediate_size;
    wrong.model.intermediate_size = mlp + 8;
    let dir = work.path().join("wrong");
    let err = Trainer::create(&dir, wrong.clone(), &device).err().unwrap().to_string();
    assert!(
        err.contains(&format!("intermediate_size = {} (the model has {mlp})", mlp + 8)),
        "{err}"
    );
    assert!(!dir.join("run.json").exists());

    // So is a quantized folder: rounded weights cannot be trained.
    let quantized = work.path().join("quantized");
    model::Huginn::from_pretrained(model.path(), &Device::flex())
        .unwrap()
        .quantize(model::Bits::Eight)
        .export_hf(&quantized, usize::MAX)
        .unwrap();
    let mut from_quantized = wrong;
    from_quantized.model.intermediate_size = mlp;
    from_quantized.init_from = Some(quantized);
    let dir = work.path().join("from-quantized");
    let err = Trainer::create(&dir, from_quantized, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("8-bit weights, which cannot be trained"), "{err}");
    assert!(!dir.join("run.json").exists());
}

#[test]
fn a_model_trained_here_fine_tunes_on_chat_messages() {
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base");
    let flags = "--task text --vocab-size 300 --seq-len 64 --steps 2 --width 16 --heads 2 --layers 1,1,1 \
                 --batch-size 2 --eval-rows 2 --mean-depth 2 --backprop 1 --out";
    let mut args: Vec<&str> = flags.split_whitespace().collect();
    args.push(base.to_str().unwrap());
    let run = train(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    // A text run has no chat template; the user gives it one.
    let template = "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}\
                    {{ m.content }}<|endoftext|>{% endgeneration %}{% else %}{{ m.content }}\n{% endif %}{% endfor %}\
                    {% if add_generation_prompt %}assistant: {% endif %}";
    std::fs::write(base.join("final/chat_template.jinja"), template).unwrap();
    let data = work.path().join("chat.jsonl");
    let records: Vec<String> = ["Romeo", "Juliet", "Tybalt"]
        .iter()
        .map(|who| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Where is {who}?")},
                {"role": "assistant", "content": "In Verona."},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(&data, records.join("\n")).unwrap();
    let tuned = work.path().join("tuned");
    let base_final = base.join("final");
    let run = train(&[
        "--init-from",
        base_final.to_str().unwrap(),
        "--task",
        "chat",
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "20",
        "--lr",
        "1e-2",
        "--warmup",
        "2",
        "--batch-size",
        "4",
        "--eval-rows",
        "3",
        "--out",
        tuned.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let losses = losses(&tuned);
    assert!(losses[19] < 0.75 * losses[0], "the reply's loss falls: {losses:?}");
    assert!(!answer(&tuned.join("final"), "Where is Romeo?", 3).is_empty());
    assert_eq!(
        std::fs::read_to_string(tuned.join("final/chat_template.jinja")).unwrap(),
        template
    );
}

#[test]
fn contradicting_flags_and_bad_chat_data_are_one_line_errors() {
    let model = folder(DEFAULT_IDS);
    let work = tempfile::tempdir().unwrap();
    let data = pairs_file(work.path());
    let (model, data) = (model.path().to_str().unwrap(), data.to_str().unwrap());
    let out = work.path().join("run");
    let out = out.to_str().unwrap();
    for (args, needle) in [
        (vec!["--init-from", model, "--width", "64"], "--width 64 contradicts"),
        (
            vec!["--init-from", model, "--layers", "1,1,1"],
            "--layers (1, 1, 1) contradicts",
        ),
        (
            vec!["--task", "chat", "--data", data],
            "--task chat needs --data FILE.jsonl and --init-from",
        ),
        (
            vec!["--init-from", model, "--task", "chat", "--data", data],
            "chat.jsonl:1: no list field `messages`",
        ),
        (
            vec!["--init-from", "test-org/absent", "--task", "chat", "--data", data],
            "test-org/absent",
        ),
    ] {
        let mut all = args.clone();
        all.extend(["--steps", "1", "--out", out]);
        let run = Command::new(env!("CARGO_BIN_EXE_huginn-train"))
            .args(&all)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HOME", work.path())
            .output()
            .unwrap();
        let stderr = stderr(&run);
        assert!(!run.status.success(), "{args:?}");
        assert!(
            stderr.contains(needle) && stderr.trim().lines().count() == 1,
            "{args:?}: wanted one line with {needle:?}: {stderr}"
        );
        assert!(!Path::new(out).join("run.json").exists(), "{args:?}");
    }
}

#[test]
fn init_from_takes_a_hub_name_and_reuses_the_cache() {
    let model = folder(DEFAULT_IDS);
    let hub = Hub::start(&[("test-org/tiny", model.path())]);
    let work = tempfile::tempdir().unwrap();
    let data = pairs_file(work.path());
    let run = |out: &str, offline: bool| {
        let out = work.path().join(out);
        let flags = "--init-from test-org/tiny --task chat --question-field q --answer-field a --steps 2 \
                     --batch-size 2 --eval-rows 2 --quiet";
        let result = hub
            .command(env!("CARGO_BIN_EXE_huginn-train"), work.path(), offline)
            .args(flags.split_whitespace())
            .args(["--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(result.status.success(), "{}", stderr(&result));
        out
    };
    let out = run("online", false);
    assert!(!hub.requests().is_empty());
    let stored = Trainer::stored_config(&out).unwrap();
    assert_eq!(stored.init_from.as_deref(), Some(Path::new("test-org/tiny")));
    assert_eq!(
        std::fs::read(out.join("final/tokenizer_config.json")).unwrap(),
        std::fs::read(model.path().join("tokenizer_config.json")).unwrap()
    );
    let before = hub.requests().len();
    run("offline", true);
    assert_eq!(hub.requests().len(), before, "the second run reads the cache");
}

#[test]
fn a_run_file_carries_init_from_and_the_chat_data() {
    let model = folder(DEFAULT_IDS);
    let work = tempfile::tempdir().unwrap();
    let data = pairs_file(work.path());
    let flags = "--task chat --question-field q --answer-field a --steps 2 --batch-size 2 --eval-rows 2 --print-config";
    let mut args: Vec<&str> = flags.split_whitespace().collect();
    args.extend([
        "--init-from",
        model.path().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    let printed = train(&args);
    assert!(printed.status.success(), "{}", stderr(&printed));
    let toml = String::from_utf8(printed.stdout).unwrap();
    assert!(toml.contains("init_from = "), "{toml}");
    let file = work.path().join("ft.toml");
    std::fs::write(&file, &toml).unwrap();
    let out = work.path().join("run");
    let run = train(&["--config", file.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(
        std::fs::read(out.join("final/tokenizer_config.json")).unwrap(),
        std::fs::read(model.path().join("tokenizer_config.json")).unwrap()
    );
    // The file's model section must be the folder's shape.
    let wrong = toml
        .replace("n_embd = 32", "n_embd = 64")
        .replace("head_dim = 8", "head_dim = 16");
    std::fs::write(&file, wrong).unwrap();
    let out = work.path().join("wrong");
    let run = train(&["--config", file.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let stderr = stderr(&run);
    assert!(
        !run.status.success()
            && stderr.contains("n_embd = 64 (the model has 32)")
            && stderr.trim().lines().count() == 1,
        "{stderr}"
    );
    assert!(!out.join("run.json").exists());
}

#[test]
fn a_record_beyond_the_models_context_is_named_by_file_and_line() {
    let model = folder(DEFAULT_IDS);
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("long.jsonl");
    let long = "many words ".repeat(60);
    let lines = [
        serde_json::json!({"q": "Short?", "a": ANSWER}),
        serde_json::json!({"q": long, "a": ANSWER}),
    ];
    std::fs::write(&file, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    let config = DataConfig::Chat {
        file: file.clone(),
        format: ChatFormat::Pair {
            question: "q".into(),
            answer: "a".into(),
        },
        folder: model.path().to_path_buf(),
    };
    let err = Dataset::new(&config, None).err().unwrap().to_string();
    assert!(
        err.starts_with(&format!("{}:2: ", file.display())) && err.contains("beyond the model's context of 256"),
        "{err}"
    );
}
