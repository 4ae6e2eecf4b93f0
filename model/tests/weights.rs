//! Loading and writing checkpoints: round trips, and a clear error for each kind of bad input.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use model::burn::prelude::*;
use model::{Huginn, HuginnConfig};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

fn tiny() -> HuginnConfig {
    HuginnConfig::tiny(48, 16, 2, (1, 2, 1))
}

fn logits(model: &Huginn) -> Vec<f32> {
    let ids = model.tokens(&[vec![1, 5, 9, 3, 7]]).unwrap();
    model
        .forward(ids, 3)
        .logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Raw tensors of a safetensors file: name → (dtype, shape, bytes).
type Raw = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_raw(path: &Path) -> Raw {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.iter()
        .map(|(k, v)| (k.to_string(), (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_raw(path: &Path, raw: &Raw) {
    let views: Vec<(String, TensorView)> = raw
        .iter()
        .map(|(k, (dtype, shape, data))| (k.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A model exported to a fresh folder, with its raw tensors.
fn exported() -> (tempfile::TempDir, Huginn, Raw) {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny().init(&Device::flex(), 3);
    model.export_hf(dir.path(), usize::MAX).unwrap();
    let raw = read_raw(&dir.path().join("model.safetensors"));
    (dir, model, raw)
}

fn load_err(dir: &Path) -> String {
    let err = Huginn::from_pretrained(dir, &Device::flex()).unwrap_err();
    let text = err.to_string();
    assert!(!text.contains('\n'), "one line: {text}");
    text
}

#[test]
fn hf_export_round_trips_and_keeps_reference_names() {
    let (dir, model, raw) = exported();
    assert!(raw.contains_key("transformer.core_block.1.attn.Wqkv.weight"));
    assert_eq!(raw["transformer.adapter.weight"].1, [16, 32]);
    assert_eq!(raw["transformer.prelude.0.mlp.fc.weight"].1, [2 * 44, 16]);
    assert_eq!(raw["lm_head.weight"].2, raw["transformer.wte.weight"].2);
    let back = Huginn::from_pretrained(dir.path(), &Device::flex()).unwrap();
    assert_eq!(logits(&model), logits(&back));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["head_dim"], 8);
    assert_eq!(config["architectures"][0], "RavenForCausalLM");
}

#[test]
fn sharded_checkpoints_load_through_their_index() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny().init(&Device::flex(), 4);
    model.export_hf(dir.path(), 8 * 1024).unwrap();
    assert!(dir.path().join("model.safetensors.index.json").exists());
    let shards = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-"))
        .count();
    assert!(shards > 2, "{shards} shards");
    let back = Huginn::from_pretrained(dir.path(), &Device::flex()).unwrap();
    assert_eq!(logits(&model), logits(&back));
}

#[test]
fn burn_record_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny().init(&Device::flex(), 5);
    model.save_burn(dir.path()).unwrap();
    let back = Huginn::from_pretrained(dir.path(), &Device::flex()).unwrap();
    assert_eq!(logits(&model), logits(&back));
}

#[test]
fn half_precision_files_are_cast_on_load() {
    let (dir, model, mut raw) = exported();
    for (dtype, shape, data) in raw.values_mut() {
        let _ = shape;
        *data = data
            .chunks_exact(4)
            .flat_map(|b| half::bf16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes())
            .collect();
        *dtype = Dtype::BF16;
    }
    write_raw(&dir.path().join("model.safetensors"), &raw);
    let back = Huginn::from_pretrained(dir.path(), &Device::flex()).unwrap();
    let diff = max_diff(&logits(&model), &logits(&back));
    assert!(diff > 0.0 && diff < 0.1, "bf16 rounding moves logits a little: {diff}");
}

#[test]
fn missing_key_is_named() {
    let (dir, _, mut raw) = exported();
    raw.remove("transformer.core_block.1.norm_3.weight");
    write_raw(&dir.path().join("model.safetensors"), &raw);
    let err = load_err(dir.path());
    assert!(
        err.contains("missing tensor \"transformer.core_block.1.norm_3.weight\""),
        "{err}"
    );
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn unexpected_key_is_named() {
    let (dir, _, mut raw) = exported();
    let extra = raw["transformer.ln_f.weight"].clone();
    raw.insert("transformer.core_block.2.norm_1.weight".into(), extra);
    write_raw(&dir.path().join("model.safetensors"), &raw);
    let err = load_err(dir.path());
    assert!(
        err.contains("unexpected tensor \"transformer.core_block.2.norm_1.weight\""),
        "{err}"
    );
}

#[test]
fn config_that_disagrees_with_the_weights_names_key_and_shapes() {
    let (dir, _, _) = exported();
    let mut config = tiny();
    config.intermediate_size = 40;
    std::fs::write(dir.path().join("config.json"), config.to_json()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("mlp.fc.weight") && err.contains("[88, 16]") && err.contains("[80, 16]"),
        "{err}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let (dir, _, mut raw) = exported();
    let entry = raw.get_mut("transformer.ln_f.weight").unwrap();
    entry.0 = Dtype::I32;
    write_raw(&dir.path().join("model.safetensors"), &raw);
    let err = load_err(dir.path());
    assert!(err.contains("transformer.ln_f.weight") && err.contains("I32"), "{err}");
}

#[test]
fn truncated_and_corrupt_files_are_errors() {
    let (dir, _, _) = exported();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("truncated or corrupt") && err.contains("model.safetensors"),
        "{err}"
    );
    std::fs::write(&path, b"not a safetensors file at all").unwrap();
    assert!(load_err(dir.path()).contains("truncated or corrupt"));
    std::fs::write(&path, b"").unwrap();
    assert!(load_err(dir.path()).contains("truncated or corrupt"));
}

#[test]
fn non_finite_weights_are_rejected() {
    let (dir, _, mut raw) = exported();
    let data = &mut raw.get_mut("transformer.adapter.weight").unwrap().2;
    data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    write_raw(&dir.path().join("model.safetensors"), &raw);
    let err = load_err(dir.path());
    assert!(
        err.contains("transformer.adapter.weight") && err.contains("non-finite"),
        "{err}"
    );
}

#[test]
fn untied_head_is_rejected() {
    let (dir, _, mut raw) = exported();
    let data = &mut raw.get_mut("lm_head.weight").unwrap().2;
    data[..4].copy_from_slice(&1.5f32.to_le_bytes());
    write_raw(&dir.path().join("model.safetensors"), &raw);
    assert!(load_err(dir.path()).contains("lm_head.weight differs"));
}

#[test]
fn bad_configs_and_missing_files_are_errors() {
    let (dir, _, _) = exported();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    config["n_heads"] = 3.into();
    config.as_object_mut().unwrap().remove("head_dim");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("n_heads = 3 does not divide n_embd = 16") && err.contains("config.json"),
        "{err}"
    );

    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(load_err(dir.path()).contains("config.json"));

    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("config.json"), tiny().to_json()).unwrap();
    assert!(load_err(empty.path()).contains("no weights found"));
}

#[test]
fn config_errors_name_the_field_that_is_missing_or_wrong() {
    let (dir, _, _) = exported();
    let path = dir.path().join("config.json");
    let full: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let err_with = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut config = full.clone();
        edit(config.as_object_mut().unwrap());
        std::fs::write(&path, config.to_string()).unwrap();
        load_err(dir.path())
    };
    let prefix = format!("{}: invalid config: ", path.display());
    for field in model::config::REQUIRED {
        assert_eq!(
            err_with(&|c| drop(c.remove(field))),
            format!("{prefix}{field} is missing (the weights' shapes depend on it)")
        );
        for bad in [json!(null), json!("16"), json!(-1), json!(1.5), json!([16])] {
            let err = err_with(&|c| drop(c.insert(field.into(), bad.clone())));
            assert!(
                err.starts_with(&format!("{prefix}{field}: invalid ")),
                "{field} = {bad}: {err}"
            );
        }
    }
    let err = err_with(&|c| drop(c.insert("norm_class_name".into(), json!(7))));
    assert!(
        err.starts_with(&format!("{prefix}norm_class_name: invalid type")),
        "{err}"
    );

    let cases: [(&str, serde_json::Value, &str); 7] = [
        (
            "n_embd",
            json!(100),
            "head_dim = 8 disagrees with n_embd / n_heads = 100 / 2 = 50",
        ),
        ("n_embd", json!(17), "n_heads = 2 does not divide n_embd = 17"),
        ("n_embd", json!(18), "head_dim = n_embd / n_heads = 18 / 2 = 9 is odd"),
        ("n_embd", json!(0), "n_embd = 0; it must be at least 1"),
        (
            "n_heads",
            json!(4),
            "head_dim = 8 disagrees with n_embd / n_heads = 16 / 4 = 4",
        ),
        (
            "vocab_size",
            json!(50),
            "padded_vocab_size = 48 disagrees with vocab_size = 50",
        ),
        (
            "intermediate_size",
            json!(usize::MAX),
            "intermediate_size = 18446744073709551615",
        ),
    ];
    for (field, value, message) in cases {
        let err = err_with(&|c| drop(c.insert(field.into(), value.clone())));
        assert!(err.contains(message), "{field} = {value}: {err}");
    }
    // Without the derived fields, a wrong size shows up on the tensors, which name the fields.
    let err = err_with(&|c| {
        c.insert("n_embd".into(), json!(32));
        c.remove("head_dim");
    });
    assert!(
        err.contains("\"transformer.wte.weight\" has shape [48, 16], the config implies [48, 32] (vocab_size, n_embd)"),
        "{err}"
    );
}

#[test]
fn missing_files_are_one_line_errors_naming_the_path_once() {
    let (dir, _, _) = exported();
    let config = dir.path().join("config.json");
    std::fs::remove_file(&config).unwrap();
    let err = Huginn::from_pretrained(dir.path(), &Device::flex()).unwrap_err();
    assert_eq!(common::chain(&err), format!("{} is missing", config.display()));

    let sharded = tempfile::tempdir().unwrap();
    tiny()
        .init(&Device::flex(), 4)
        .export_hf(sharded.path(), 8 * 1024)
        .unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sharded.path().join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shard = sharded
        .path()
        .join(index["weight_map"]["transformer.wte.weight"].as_str().unwrap());
    std::fs::remove_file(&shard).unwrap();
    let err = Huginn::from_pretrained(sharded.path(), &Device::flex()).unwrap_err();
    assert_eq!(common::chain(&err), format!("{} is missing", shard.display()));

    // Other I/O failures keep the OS's words, once.
    std::fs::create_dir(&shard).unwrap();
    let err = common::chain(&Huginn::from_pretrained(sharded.path(), &Device::flex()).unwrap_err());
    assert!(err.starts_with(&format!("cannot read {}: ", shard.display())), "{err}");
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}

#[test]
fn loads_the_reference_fixture_checkpoint_with_its_rope_table_and_both_tied_copies() {
    let dir = common::fixture_dir("tiny-d");
    let model = Huginn::from_pretrained(&dir, &Device::flex()).unwrap();
    assert_eq!(model.config().n_layers_in_recurrent_block, 4);
    assert_eq!(model.core_block.len(), 4);
}

#[test]
fn bad_token_input_is_an_error() {
    let model = tiny().init(&Device::flex(), 1);
    assert!(
        model
            .tokens(&[vec![48]])
            .unwrap_err()
            .to_string()
            .contains("outside the vocabulary")
    );
    assert!(model.tokens(&[vec![1, 2], vec![3]]).is_err());
    assert!(
        model
            .tokens(&[vec![0; 257]])
            .unwrap_err()
            .to_string()
            .contains("context length of 256")
    );
    assert!(model.tokens(&[]).is_err());
}
