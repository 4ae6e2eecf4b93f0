//! A tiny model's folder with a byte-level tokenizer carrying Huginn's special tokens, Huginn's
//! chat template and a generation config (the train tests include it too).
#![allow(dead_code)] // each test file uses its own part

use std::path::Path;

use folder::ModelFolder;
use infer::adaptive::AdaptiveConfig;
use infer::strategy::Strategy;
use infer::warm_start::WarmStart;
use model::HuginnConfig;
use model::burn::prelude::Device;
use serde_json::json;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Huginn's template, as `evaluate_raven/checkpoint_to_hf_converter.py` uploads it.
pub const HUGINN_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set start_content = '<|begin_header|>' %}{% set end_content = message['content'] | trim  + '<|end_turn|>' %}{% if loop.index0 == 0 %}{% set start_content = bos_token + start_content %}{% endif %}{% if message['role'] == 'Huginn' or message['role'] == 'assistant' %}{% set start_content = start_content + 'Huginn<|end_header|>\\n\\n' %}{{ start_content }}{% generation %}{{ end_content }}{% endgeneration %}{% else %}{% set start_content = start_content + message['role'] + '<|end_header|>\\n\\n' %}{{ start_content }}{{ end_content }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|begin_header|>Huginn<|end_header|>\\n\\n' }}{% else %}{{ '<|end_text|>' }}{% endif %}";

/// Huginn's special tokens (ids 65504-65509 there).
pub const SPECIALS: [&str; 6] = [
    "<|begin_text|>",
    "<|end_text|>",
    "<|begin_header|>",
    "<|end_header|>",
    "<|end_turn|>",
    "<|pad|>",
];
pub const VOCAB: usize = 256 + SPECIALS.len();
pub const STEPS: usize = 3;

/// A byte-level BPE without merges: the special tokens at `ids`, the 256 bytes at the others.
pub fn tokenizer(ids: [u32; 6]) -> Tokenizer {
    let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    bytes.sort();
    let free = (0..VOCAB as u32).filter(|i| !ids.contains(i));
    let mut vocab: Vocab = bytes.iter().map(char::to_string).zip(free).collect();
    vocab.extend(SPECIALS.iter().map(|s| s.to_string()).zip(ids));
    let mut tokenizer = Tokenizer::new(BPE::builder().vocab_and_merges(vocab, vec![]).build().unwrap());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer
        .add_special_tokens(SPECIALS.map(|s| AddedToken::from(s, true)))
        .unwrap();
    tokenizer
}

pub const DEFAULT_IDS: [u32; 6] = [256, 257, 258, 259, 260, 261];

/// A tiny model's folder with every text file; the tokenizer's special tokens at `ids`.
pub fn folder(ids: [u32; 6]) -> tempfile::TempDir {
    folder_of_seed(ids, 5)
}

pub fn folder_of_seed(ids: [u32; 6], seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = HuginnConfig::tiny(VOCAB, 32, 4, (1, 2, 1)).init(&Device::flex(), seed);
    model.export_hf(dir.path(), usize::MAX).unwrap();
    tokenizer(ids).save(dir.path().join("tokenizer.json"), false).unwrap();
    write_json(
        dir.path(),
        "tokenizer_config.json",
        json!({
            "bos_token": "<|begin_text|>",
            "eos_token": {"content": "<|end_text|>", "lstrip": false, "__type": "AddedToken"},
            "pad_token": "<|pad|>",
            "chat_template": HUGINN_TEMPLATE,
            "model_max_length": 1_000_000_000u64,
        }),
    );
    write_json(
        dir.path(),
        "generation_config.json",
        json!({"bos_token_id": ids[0], "eos_token_id": ids[1], "pad_token_id": ids[5], "max_length": 48}),
    );
    dir
}

pub fn write_json(dir: &Path, file: &str, value: serde_json::Value) {
    std::fs::write(dir.join(file), value.to_string()).unwrap();
}

pub fn open(dir: &Path) -> ModelFolder {
    ModelFolder::open(dir, &Device::flex()).unwrap()
}

pub fn fixed() -> AdaptiveConfig {
    AdaptiveConfig::fixed(STEPS, WarmStart::Cold, Strategy::default())
}
