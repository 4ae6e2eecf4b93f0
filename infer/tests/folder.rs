//! Model folders with text files: a tiny model exported beside a byte-level tokenizer carrying
//! Huginn's special tokens, Huginn's chat template and a generation config; what the library
//! reads from them, the errors for malformed files, and `huginn generate` streaming text.

use folder::ModelFolder;
use folder::chat::{Message, Role};
use infer::adaptive::{self, Decoding};
use model::HuginnConfig;
use model::burn::prelude::Device;
use serde_json::json;
use tokenizers::AddedToken;

mod common;

use common::*;

#[test]
fn a_folder_gives_its_tokenizer_template_defaults_and_stop_tokens() {
    let dir = folder(DEFAULT_IDS);
    let folder = open(dir.path());
    let tokenizer = folder.tokenizer.as_ref().unwrap();
    assert_eq!(folder.special_tokens.bos.as_deref(), Some("<|begin_text|>"));
    assert_eq!(
        folder.special_tokens.eos.as_deref(),
        Some("<|end_text|>"),
        "AddedToken form"
    );
    assert_eq!(folder.generation.max_new_tokens(8), Some(40));
    // generation_config's eos, then the reference's stops <|begin_text|> and <|end_turn|>.
    assert_eq!(folder.stop_tokens, [257, 256, 260]);
    let messages = [Message::new(Role::System, "Be brief."), Message::new(Role::User, "Hi!")];
    let rendered = "<|begin_text|><|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>\
                    <|begin_header|>user<|end_header|>\n\nHi!<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n";
    let ids = folder.encode_chat(&messages).unwrap();
    assert_eq!(ids, tokenizer.encode(rendered, false).unwrap().get_ids());
    assert_eq!((ids[0], ids[1]), (256, 258));
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), rendered);
    // A plain prompt: BOS, then the text's bytes.
    let ids = folder.encode("Hi").unwrap();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids[0], 256);
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "Hi");
}

#[test]
fn stop_strings_that_are_special_tokens_become_stop_tokens() {
    let dir = folder(DEFAULT_IDS);
    write_json(
        dir.path(),
        "generation_config.json",
        json!({"eos_token_id": [257, 9], "stop_strings": ["<|end_header|>", "\n\n"]}),
    );
    let mut folder = open(dir.path());
    assert_eq!(folder.stop_tokens, [257, 9, 256, 260, 259]);
    assert_eq!(folder.stop_strings, ["\n\n"]);
    folder.add_stop_strings(["<|pad|>".to_string(), "User:".to_string(), "\n\n".to_string()]);
    assert_eq!(folder.stop_tokens, [257, 9, 256, 260, 259, 261]);
    assert_eq!(folder.stop_strings, ["\n\n", "User:"]);
}

#[test]
fn missing_optional_files_are_fine() {
    let dir = tempfile::tempdir().unwrap();
    let model = HuginnConfig::tiny(VOCAB, 32, 4, (1, 2, 1)).init(&Device::flex(), 5);
    model.save_burn(dir.path()).unwrap();
    let folder = open(dir.path());
    assert!(folder.tokenizer.is_none() && folder.chat_template.is_none());
    assert!(folder.stop_tokens.is_empty() && folder.stop_strings.is_empty());
    assert_eq!(folder.generation, Default::default());
    let err = folder.encode("Hi").unwrap_err().to_string();
    assert_eq!(err, "the model folder has no tokenizer (tokenizer.json)");
    // A tokenizer without a tokenizer_config.json: no template, no BOS.
    tokenizer(DEFAULT_IDS)
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    let folder = open(dir.path());
    assert_eq!(folder.encode("Hi").unwrap().len(), 2);
    assert_eq!(folder.stop_tokens, [256, 257, 260], "the reference's stops");
    let err = folder.encode_chat(&[Message::new(Role::User, "Hi")]).unwrap_err();
    assert!(err.to_string().contains("has no chat template"), "{err}");
}

#[test]
fn malformed_files_are_one_line_errors_naming_the_file() {
    let base = folder(DEFAULT_IDS);
    let mut too_big = tokenizer(DEFAULT_IDS);
    too_big
        .add_special_tokens([AddedToken::from("<|extra|>", true)])
        .unwrap();
    let too_big = too_big.to_string(false).unwrap();
    let cases: [(&str, &str, &str); 8] = [
        ("tokenizer.json", "{\"model\": 1}", "invalid tokenizer"),
        (
            "tokenizer.json",
            &too_big,
            "token id 262 is outside the model's vocabulary of 262",
        ),
        ("tokenizer_config.json", "{", "invalid tokenizer config"),
        (
            "tokenizer_config.json",
            "{\"bos_token\": 7}",
            "invalid tokenizer config",
        ),
        (
            "tokenizer_config.json",
            "{\"chat_template\": \"{% for %}\"}",
            "invalid chat template",
        ),
        (
            "tokenizer_config.json",
            "{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"x\"}]}",
            "no template named \"default\"",
        ),
        ("chat_template.jinja", "{% if messages %}", "invalid chat template"),
        (
            "generation_config.json",
            "{\"eos_token_id\": \"x\"}",
            "invalid generation config",
        ),
    ];
    for (file, content, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(base.path()).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
        std::fs::write(dir.path().join(file), content).unwrap();
        let err = ModelFolder::open(dir.path(), &Device::flex()).unwrap_err().to_string();
        let path = dir.path().join(file).display().to_string();
        assert!(err.starts_with(&format!("{path}: ")), "{file}: {err}");
        assert!(err.contains(needle), "{file}: {err}");
        assert!(!err.contains('\n'), "{file}: {err}");
    }
}

#[test]
fn huginns_end_of_turn_and_end_of_text_tokens_end_generation() {
    // Which tokens the tiny model picks does not depend on the tokenizer: name the third new
    // one <|end_turn|> (the reference's stop) or <|end_text|> (generation_config's eos).
    let prompt = vec![40, 41, 42, 43];
    let free = adaptive::generate(&open(folder(DEFAULT_IDS).path()).model, &prompt, 12, fixed())
        .unwrap()
        .tokens;
    let k = (2..free.len())
        .find(|&k| !free[..k].contains(&free[k]))
        .expect("a new token");
    let spare: Vec<u32> = (200..VOCAB as u32).filter(|i| !free.contains(i)).collect();
    for named in [4, 1] {
        let mut ids: [u32; 6] = spare[..6].try_into().unwrap();
        ids[named] = free[k];
        let folder = open(folder(ids).path());
        let decoding = Decoding {
            stop_tokens: folder.stop_tokens.clone(),
            ..Default::default()
        };
        let out = adaptive::generate_batch_with(&folder.model, std::slice::from_ref(&prompt), 12, fixed(), &decoding)
            .unwrap();
        assert_eq!(out[0].tokens, free[..=k], "{}", SPECIALS[named]);
    }
}

#[test]
fn chat_generation_streams_the_text_of_the_greedy_tokens() {
    // This model answers with two-byte characters, so characters span tokens.
    let dir = folder_of_seed(DEFAULT_IDS, 7);
    let model = dir.path().to_str().unwrap();
    let out = huginn(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "What is 2+2?",
        "--chat",
        "--system",
        "Be brief.",
        "--steps",
        "3",
        "--max-new-tokens",
        "10",
    ]);
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let folder = open(dir.path());
    let prompt = folder
        .encode_chat(&[
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "What is 2+2?"),
        ])
        .unwrap();
    let decoding = Decoding {
        stop_tokens: folder.stop_tokens.clone(),
        ..Default::default()
    };
    let greedy = adaptive::generate_batch_with(&folder.model, &[prompt], 10, fixed(), &decoding).unwrap();
    let text = folder
        .tokenizer
        .as_ref()
        .unwrap()
        .decode(&greedy[0].tokens, true)
        .unwrap();
    assert!(
        text.chars()
            .any(|c| c.len_utf8() > 1 && c != char::REPLACEMENT_CHARACTER),
        "{text:?}"
    );
    assert_eq!(stdout, format!("{text}\n"));
    let steps = vec!["3"; greedy[0].tokens.len()].join(",");
    assert!(stderr.contains(&format!("steps per token: {steps} ")), "{stderr}");
}

#[test]
fn stop_strings_cut_the_streamed_text() {
    let dir = folder(DEFAULT_IDS);
    let model = dir.path().to_str().unwrap();
    let args = [
        "generate",
        "--model",
        model,
        "--prompt",
        "Once upon a time",
        "--steps",
        "3",
        "--max-new-tokens",
        "16",
    ];
    let full = String::from_utf8(huginn(&args).stdout).unwrap();
    // Two characters from the middle of the text (each byte is one token, so the stop string
    // spans tokens).
    let chars: Vec<char> = full.trim_end_matches('\n').chars().collect();
    let at = (chars.len() / 2).max(1);
    let stop: String = chars[at..at + 2].iter().collect();
    let out = huginn(&[&args[..], &["--stop", &stop, "--stop", "never said"]].concat());
    assert!(out.status.success());
    let cut = &full[..full.find(&stop).unwrap()];
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{cut}\n"),
        "stop {stop:?} in {full:?}"
    );
}

#[test]
fn text_options_without_the_files_they_need_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    HuginnConfig::tiny(VOCAB, 32, 4, (1, 2, 1))
        .init(&Device::flex(), 5)
        .save_burn(dir.path())
        .unwrap();
    let model = dir.path().to_str().unwrap();
    assert!(
        !huginn(&["generate", "--chat", "--ids", "1"]).status.success(),
        "--chat takes --prompt"
    );
    let cases: [(&[&str], &str); 3] = [
        (&["--prompt", "Hi"], "no tokenizer (tokenizer.json)"),
        (&["--ids", "1,2", "--stop", "x"], "--stop needs a tokenizer"),
        (&["--prompt", "Hi", "--chat"], "no tokenizer"),
    ];
    for (args, needle) in cases {
        let out = huginn(&[&["generate", "--model", model][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr.contains(needle) && stderr.trim().lines().count() == 1,
            "{args:?}: {stderr}"
        );
    }
    // Without a tokenizer, ids stream; --stop-token ends generation after the token.
    let ids_args = [
        "generate",
        "--model",
        model,
        "--ids",
        "1,2,3",
        "--steps",
        "2",
        "--max-new-tokens",
        "6",
    ];
    let ids = String::from_utf8(huginn(&ids_args).stdout).unwrap();
    let ids: Vec<&str> = ids.trim().split(',').collect();
    assert_eq!(ids.len(), 6);
    let k = (1..6).find(|&k| !ids[..k].contains(&ids[k])).unwrap_or(0);
    let out = huginn(&[&ids_args[..], &["--stop-token", ids[k]]].concat());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n", ids[..=k].join(","))
    );
    tokenizer(DEFAULT_IDS)
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    let out = huginn(&["generate", "--model", model, "--prompt", "Hi", "--chat"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has no chat template"), "{stderr}");
}

#[test]
fn generate_reads_the_prompt_from_stdin_and_ends_with_a_stats_line() {
    use std::io::Write;
    let dir = folder_of_seed(DEFAULT_IDS, 7);
    let path = dir.path().to_str().unwrap();
    let args = ["generate", "--model", path, "--steps", "3", "--max-new-tokens", "6"];
    let given = huginn(&[&args[..], &["--prompt", "Hello"]].concat());
    assert!(given.status.success());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_huginn"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hello\n").unwrap();
    let piped = child.wait_with_output().unwrap();
    assert!(piped.status.success(), "{}", String::from_utf8_lossy(&piped.stderr));
    assert_eq!(piped.stdout, given.stdout);
    let stats = String::from_utf8(piped.stderr).unwrap();
    let last = stats.lines().last().unwrap();
    assert!(
        last.starts_with("prompt 6 tokens, ")
            && last.contains("decode 5 tokens, ")
            && last.ends_with("mean 3.00, max 3"),
        "{last}"
    );
    // An empty standard input is an error, not an empty prompt.
    let empty = std::process::Command::new(env!("CARGO_BIN_EXE_huginn"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("standard input is empty"));
}

#[test]
fn chat_keeps_its_cache_between_turns() {
    use std::io::Write;
    let dir = folder_of_seed(DEFAULT_IDS, 7);
    let path = dir.path().to_str().unwrap();
    let flags = ["--steps", "3", "--max-new-tokens", "8"];
    let single = huginn(&[&["generate", "--model", path, "--chat", "--prompt", "Hi!"][..], &flags].concat());
    assert!(single.status.success());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_huginn"))
        .args([&["chat", "--model", path][..], &flags].concat())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hi!\n\nHow are you?\n/exit\nnever read\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    // The first turn is `generate --chat`'s answer; the second turn follows it.
    assert!(
        stdout.starts_with(&String::from_utf8(single.stdout).unwrap()),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    let reused: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.split(" of ").next()?.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(reused.len(), 2, "{stderr}");
    assert_eq!(reused[0], 0);
    // The second turn's rendering starts with the first turn's tokens.
    assert!(reused[1] > 10, "{stderr}");
}

#[test]
fn a_missing_or_incomplete_config_is_one_line_naming_the_file_and_the_field() {
    let dir = folder(DEFAULT_IDS);
    let model = dir.path().to_str().unwrap();
    let config = dir.path().join("config.json");
    let generate = ["generate", "--model", model, "--ids", "1,2,3", "--max-new-tokens", "2"];
    let stderr = || String::from_utf8(huginn(&generate).stderr).unwrap();

    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    value.as_object_mut().unwrap().remove("n_embd");
    std::fs::write(&config, value.to_string()).unwrap();
    assert_eq!(
        stderr(),
        format!(
            "error: loading {model}: {}: invalid config: n_embd is missing (the weights' shapes depend on it)\n",
            config.display()
        )
    );

    std::fs::remove_file(&config).unwrap();
    assert_eq!(
        stderr(),
        format!("error: loading {model}: {} is missing\n", config.display())
    );
}
