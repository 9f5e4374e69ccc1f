//! Writing a model as a Hugging Face directory and loading it back.

mod common;

use std::collections::HashMap;

use common::{batch, capture_all, max_abs_diff, smollm2};
use flexmodel::Checkpoint;
use flexmodel::tiny::tiny_checkpoint;

#[test]
fn smollm2_written_as_hf_directory_loads_back_with_identical_logits() {
    let (checkpoint, model) = smollm2();
    let dir = tempfile::tempdir().unwrap();
    checkpoint.save_hf_dir(dir.path()).unwrap();
    let reloaded = Checkpoint::open_hf_dir(dir.path()).unwrap();
    assert_eq!(reloaded.config, checkpoint.config);
    let tokens = batch(&[&[504, 3575, 282, 4649, 314]]);
    let (expected, _) = capture_all(model, &tokens);
    let (actual, _) = capture_all(&reloaded.load_model().unwrap(), &tokens);
    assert_eq!(max_abs_diff(&actual, &expected), 0.0);
    let text = "The capital of France is Paris. 1234 <|im_start|>user";
    assert_eq!(
        reloaded.tokenizer.encode(text).unwrap(),
        checkpoint.tokenizer.encode(text).unwrap()
    );
}

#[test]
fn tiny_model_round_trips_through_hf_directory_via_open() {
    let checkpoint = tiny_checkpoint(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    checkpoint.save_hf_dir(dir.path()).unwrap();
    let reloaded = Checkpoint::open(dir.path().to_str().unwrap()).unwrap();
    let tokens = batch(&[&[1, 2, 3], &[250, 251, 252]]);
    let (expected, _) = capture_all(&checkpoint.load_model().unwrap(), &tokens);
    let (actual, _) = capture_all(&reloaded.load_model().unwrap(), &tokens);
    assert_eq!(max_abs_diff(&actual, &expected), 0.0);
}

#[test]
fn sharded_safetensors_with_index_load_like_one_file() {
    let checkpoint = tiny_checkpoint(2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    checkpoint.save_hf_dir(dir.path()).unwrap();
    // Re-split model.safetensors into two shards listed in an index.
    let single = dir.path().join("model.safetensors");
    let all = candle_core::safetensors::load(&single, &candle_core::Device::Cpu).unwrap();
    std::fs::remove_file(&single).unwrap();
    let mut shards: [HashMap<String, candle_core::Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (i, (name, tensor)) in all.into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), file.into());
        shards[i % 2].insert(name, tensor);
    }
    for (i, shard) in shards.iter().enumerate() {
        let path = dir
            .path()
            .join(format!("model-0000{}-of-00002.safetensors", i + 1));
        candle_core::safetensors::save(shard, path).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let reloaded = Checkpoint::open_hf_dir(dir.path()).unwrap();
    let tokens = batch(&[&[9, 8, 7, 6]]);
    let (expected, _) = capture_all(&checkpoint.load_model().unwrap(), &tokens);
    let (actual, _) = capture_all(&reloaded.load_model().unwrap(), &tokens);
    assert_eq!(max_abs_diff(&actual, &expected), 0.0);
}
