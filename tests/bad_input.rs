//! Bad files and bad input give errors that name what was wrong, never panics.

mod common;

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::Value;
use common::{batch, write_gguf, write_gguf_with_metadata};
use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{Checkpoint, Error};

/// The error of opening `model` and building its model.
fn open_error(model: &Path) -> Error {
    match Checkpoint::open(model.to_str().unwrap()).and_then(|c| c.load_model()) {
        Ok(_) => panic!("{} opened without error", model.display()),
        Err(e) => e,
    }
}

fn tiny_gguf(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tiny.gguf");
    write_gguf(&tiny_checkpoint(0).unwrap(), &path, |_| GgmlDType::F32);
    path
}

fn tiny_hf_dir(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tiny");
    tiny_checkpoint(0).unwrap().save_hf_dir(&path).unwrap();
    path
}

#[test]
fn missing_file_is_named() {
    let err = open_error(Path::new("/nonexistent/model.gguf"));
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn unknown_model_name_says_what_is_accepted() {
    let err = Checkpoint::open("gpt5").err().unwrap();
    assert!(
        err.to_string().contains(
            "expected `smollm2`, `gemma3-270m`, a .gguf file or a Hugging Face model directory"
        ),
        "{err}"
    );
}

#[test]
fn garbage_gguf_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.gguf");
    std::fs::write(&path, b"this is not a gguf file at all").unwrap();
    let err = open_error(&path);
    assert!(matches!(err, Error::BadWeightsFile { .. }), "{err:?}");
    assert!(err.to_string().contains("garbage.gguf"), "{err}");
}

#[test]
fn gguf_truncated_in_its_header_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gguf(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..200]).unwrap();
    let err = open_error(&path);
    assert!(matches!(err, Error::BadWeightsFile { .. }), "{err:?}");
}

#[test]
fn gguf_truncated_in_its_tensors_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gguf(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = open_error(&path);
    let Error::BadTensor {
        path: p, tensor, ..
    } = &err
    else {
        panic!("expected a tensor error, got {err:?}");
    };
    assert_eq!(p, &path);
    assert!(
        tensor.starts_with("blk.") || tensor.starts_with("output"),
        "{tensor}"
    );
}

/// Rewrites the type field of the first tensor in a GGUF's tensor table.
fn set_first_tensor_type(path: &Path, ggml_type: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    // The table entry of the embedding: name, n_dims (u32), dims (u64 each), type (u32).
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * n_dims;
    bytes[type_at..type_at + 4].copy_from_slice(&ggml_type.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn unsupported_quantization_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gguf(dir.path());
    set_first_tensor_type(&path, 99);
    let err = open_error(&path);
    let message = err.to_string();
    assert!(
        message.contains("tiny.gguf") && message.contains("99"),
        "{message}"
    );
    assert!(message.contains("supported tensor types"), "{message}");
}

#[test]
fn unsupported_gguf_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_gguf(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // Same length, so the file stays well-formed.
    let at = bytes.windows(5).position(|w| w == b"llama").unwrap();
    bytes[at..at + 5].copy_from_slice(b"gpt-j");
    std::fs::write(&path, bytes).unwrap();
    let err = open_error(&path);
    assert!(
        err.to_string()
            .contains("unsupported architecture \"gpt-j\""),
        "{err}"
    );
}

#[test]
fn tensor_of_wrong_shape_names_file_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_dir(dir.path());
    let file = model.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    tensors.insert(
        name.into(),
        candle_core::Tensor::zeros((5, 64), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = open_error(&model);
    assert_eq!(
        err.to_string(),
        format!(
            "{}: tensor {name} has shape [5, 64], the configuration requires [192, 64]",
            model.display()
        )
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_dir(dir.path());
    let file = model.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    tensors.remove("model.norm.weight");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = open_error(&model);
    assert!(
        err.to_string()
            .ends_with("tensor model.norm.weight: not found"),
        "{err}"
    );
}

#[test]
fn corrupt_and_truncated_safetensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_dir(dir.path());
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    for broken in [
        &bytes[..bytes.len() - 100],
        b"garbage bytes, not safetensors".as_slice(),
    ] {
        std::fs::write(&file, broken).unwrap();
        let err = open_error(&model);
        assert!(matches!(err, Error::BadWeightsFile { .. }), "{err:?}");
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }
}

#[test]
fn malformed_config_json_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_dir(dir.path());
    std::fs::write(model.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let err = open_error(&model);
    assert!(
        err.to_string().contains("config.json") && err.to_string().contains("missing field"),
        "{err}"
    );
}

#[test]
fn missing_tokenizer_json_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_dir(dir.path());
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let err = open_error(&model);
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn token_outside_the_vocabulary_is_rejected() {
    let model = tiny_checkpoint(0).unwrap().load_model().unwrap();
    let err = model
        .forward(&batch(&[&[1, 256]]), &mut flexmodel::NoHooks)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "token id 256 is outside the vocabulary (size 256)"
    );
}

#[test]
fn tokens_must_be_a_batch_of_sequences() {
    let model = tiny_checkpoint(0).unwrap().load_model().unwrap();
    let flat = candle_core::Tensor::new(&[1u32, 2, 3], &candle_core::Device::Cpu).unwrap();
    let err = model.forward(&flat, &mut flexmodel::NoHooks).unwrap_err();
    assert!(matches!(err, Error::BadTokens { .. }), "{err:?}");
}

#[test]
fn gguf_rope_scaling_sliding_windows_and_partial_rope_are_refused_like_hugging_face() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(0).unwrap();
    let cases: Vec<(Vec<(&str, Value)>, &str)> = vec![
        (
            vec![
                ("llama.rope.scaling.type", Value::String("linear".into())),
                ("llama.rope.scaling.factor", Value::F32(2.0)),
            ],
            "RoPE scaling (linear by 2) is not supported",
        ),
        (
            vec![("llama.attention.sliding_window", Value::U32(16))],
            "sliding-window attention (a window of 16 tokens in a context of 512) is not supported",
        ),
        (
            vec![("llama.rope.dimension_count", Value::U32(4))],
            "RoPE on 4 of the 8 dimensions of each head is not supported",
        ),
    ];
    for (i, (extra, expected)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("refused{i}.gguf"));
        write_gguf_with_metadata(&checkpoint, &path, |_| GgmlDType::F32, extra);
        let err = open_error(&path);
        assert!(matches!(err, Error::BadConfig { .. }), "{err:?}");
        assert!(err.to_string().contains(expected), "{err}");
        assert!(
            err.to_string().contains(&format!("refused{i}.gguf")),
            "{err}"
        );
    }
    let fine = dir.path().join("fine.gguf");
    let full = vec![
        ("llama.rope.dimension_count", Value::U32(8)),
        ("llama.attention.sliding_window", Value::U32(512)),
        ("llama.rope.scaling.type", Value::String("none".into())),
    ];
    write_gguf_with_metadata(&checkpoint, &fine, |_| GgmlDType::F32, full);
    assert!(Checkpoint::open(fine.to_str().unwrap()).is_ok());
}

#[test]
fn hugging_face_rope_scalings_not_implemented_or_incomplete_are_refused_naming_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hf_dir(dir.path());
    let config = model.join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    for (scaling, expected) in [
        (
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "is not supported: implemented are linear, dynamic and llama3",
        ),
        (
            serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
            "of type llama3 needs a number \"low_freq_factor\"",
        ),
    ] {
        let mut json = original.clone();
        json["rope_scaling"] = scaling;
        std::fs::write(&config, json.to_string()).unwrap();
        let err = open_error(&model);
        assert!(matches!(err, Error::BadConfig { .. }), "{err:?}");
        assert!(err.to_string().contains("config.json"), "{err}");
        assert!(err.to_string().contains("RoPE scaling ("), "{err}");
        assert!(err.to_string().contains(expected), "{err}");
    }
}
