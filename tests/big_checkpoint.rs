//! A checkpoint of 2 GB (bf16, four safetensors files) under worker processes at
//! tp=2 × pp=2: each worker reads only its rank's share of the weights at start-up and
//! holds only that share (plus one slice while loading), the driver holds no weights,
//! and the capture equals the single shard's. Alone in its binary, so that this
//! process's peak memory is the driver's.

mod common;

use candle_core::Tensor;
use common::rel_error;
use flexmodel::models::LlamaConfig;
use flexmodel::runtime::sharding::rank_weight_bytes;
use flexmodel::tiny::{tiny_config, write_random_hf_dir};
use flexmodel::{Checkpoint, FlexModel, HookFunction};
use flexmodel_cluster::Layout;

/// 19 layers of a LLaMA 2-style block at d_model 2048: 1.03 G parameters, 2.05 GB in bf16.
fn two_gb_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 32_000,
        d_model: 2048,
        n_layers: 19,
        n_heads: 16,
        n_kv_heads: 8,
        d_head: 128,
        d_mlp: 5632,
        max_position_embeddings: 4096,
        ..tiny_config()
    }
}

/// A field of `/proc/PID/FILE` (`VmHWM` of `status`, `rchar` of `io`), in bytes.
fn proc_field(pid: &str, file: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/{file}"));
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next().unwrap().parse().unwrap();
    match words.next() {
        Some("kB") => value * 1024,
        _ => value,
    }
}

const MB: f64 = 1e6;

/// What a rank reads besides its share: the files' headers, `config.json`,
/// `tokenizer.json`, the fingerprint's samples (8 KiB of each of 174 tensors) and its
/// sockets' traffic while it joins. Measured: 1.5 MB.
const READ_OVERHEAD: u64 = 8 << 20;

#[test]
fn a_two_gb_checkpoint_under_procs_is_read_and_held_a_share_per_rank() {
    let dir = tempfile::tempdir().unwrap();
    let config = two_gb_config();
    let bytes = write_random_hf_dir(dir.path(), &config, 4, 29).unwrap();
    assert!(bytes >= 2_000_000_000, "{bytes} bytes");
    // From here on, this process's peak memory is the driver's.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();

    let checkpoint = Checkpoint::open_hf_dir(dir.path()).unwrap();
    let layout = Layout::new(1, 2, 2).unwrap();
    let placement = common::parity::worker_processes();
    let mut model = FlexModel::build_on(&checkpoint, layout, &placement).unwrap();
    let pids = model.worker_pids().unwrap();
    for (rank, pid) in pids.iter().enumerate() {
        let share = rank_weight_bytes(&checkpoint.config, &layout, rank) / 2;
        let read = proc_field(&pid.to_string(), "io", "rchar");
        eprintln!(
            "rank {rank}: read {:.1} MB at start-up for a share of {:.1} MB on disk",
            read as f64 / MB,
            share as f64 / MB
        );
        assert!(
            (share..share + READ_OVERHEAD).contains(&read),
            "rank {rank} read {read} bytes for a share of {share}"
        );
    }

    let point = "blocks.3.hook_resid_post";
    let tokens: Vec<u32> = (0..32u32).map(|i| (i * 7919) % 32_000).collect();
    let tokens = Tensor::from_vec(tokens, (2, 16), &candle_core::Device::Cpu).unwrap();
    model
        .hooks_mut()
        .register(HookFunction::new(point))
        .unwrap();
    model.forward(&tokens).unwrap();
    let sharded = model.store().last(point).unwrap().clone();

    let peaks = model.worker_peak_rss_bytes().unwrap();
    let largest_slice = 32_000 / 2 * 2048 * 4; // the embedding's and the LM head's rows
    for (rank, peak) in peaks.into_iter().enumerate() {
        let peak = peak.unwrap();
        let held = rank_weight_bytes(&checkpoint.config, &layout, rank);
        let overhead = peak.saturating_sub(held + largest_slice);
        eprintln!(
            "rank {rank}: peak {:.0} MB holding {:.0} MB of weights ({:.0} MB over them and the largest slice)",
            peak as f64 / MB,
            held as f64 / MB,
            overhead as f64 / MB
        );
        assert!(
            peak <= held + largest_slice + WORKER_OVERHEAD,
            "rank {rank}: peak {peak} bytes for {held} bytes of weights"
        );
    }
    let driver = proc_field("self", "status", "VmHWM");
    eprintln!("driver: peak {:.0} MB", driver as f64 / MB);
    assert!(driver <= DRIVER_PEAK, "the driver peaked at {driver} bytes");
    drop(model);

    // The single shard, f32 in this process (4.1 GB).
    let mut single = FlexModel::build(&checkpoint, Layout::SINGLE).unwrap();
    single
        .hooks_mut()
        .register(HookFunction::new(point))
        .unwrap();
    single.forward(&tokens).unwrap();
    let expected = single.store().last(point).unwrap();
    let error = rel_error(&sharded, expected);
    eprintln!("{point}: relative error {error:.2e} against the single shard");
    assert!(error < TOLERANCE, "{error}");
}

/// A worker's memory beyond its weights and one slice: the binary, its threads, the
/// pass's activations. Measured: 36 to 39 MB.
const WORKER_OVERHEAD: u64 = 200 << 20;
/// The driver's peak: the test binary, the headers and the fingerprint's samples; no
/// weights. Measured: 28 MB.
const DRIVER_PEAK: u64 = 200 << 20;
/// The relative error of a capture against the single shard. Measured: 8.4e-7.
const TOLERANCE: f64 = 5e-6;
