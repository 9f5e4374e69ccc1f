//! SmolLM2 with every rank a worker process at (tp, pp, dp) = (3, 2, 2): every hook
//! point, plain and edited, and every gradient of an edited pass equal the single shard.

mod common;

use common::{assert_matches_single, smollm2, smollm2_passes};
use flexmodel::FlexModel;
use flexmodel::runtime::{Placement, Processes};
use flexmodel_cluster::Layout;

/// As in `sharded_smollm2.rs`: the worst measured in-process is 3.1e-6 (tp=3).
const TOLERANCE: f64 = 2e-5;
/// As in `sharded_smollm2.rs`: the worst measured in-process is 3.4e-5 (tp=3, edited).
const GRADIENT_TOLERANCE: f64 = 1e-4;
/// The memory of a worker process before it holds any weight (code, tokenizer,
/// buffers): 34 MB measured (SmolLM2 at tp=3 pp=2 dp=2).
const BASELINE: u64 = 64 << 20;

#[test]
fn smollm2_in_twelve_worker_processes_matches_the_single_shard() {
    let (checkpoint, _) = smollm2();
    let single = smollm2_passes(&mut FlexModel::build(checkpoint, Layout::SINGLE).unwrap());
    let processes = Placement::Processes(Processes {
        program: Some(common::flexmodel_binary()),
        threads: Some(1),
        token_file: None,
    });
    let layout = Layout::new(2, 2, 3).unwrap();
    let mut model = FlexModel::build_on(checkpoint, layout, &processes).unwrap();
    // Each worker read only its slices, one tensor at a time: its peak memory while
    // loading is its share plus at most the largest tensor (the embedding, read whole
    // and then sliced) and the process's own baseline, far below the whole model.
    let config = &checkpoint.config;
    let largest = (config.vocab_size() * config.d_model() * 4) as u64;
    let whole = config.parameter_count() * 4;
    let shares = model.shard_weight_bytes();
    let peaks = model.worker_peak_rss_bytes().unwrap();
    for (rank, (share, peak)) in shares.iter().zip(&peaks).enumerate() {
        let peak = peak.unwrap();
        let beyond = peak as i64 - *share as i64 - largest as i64;
        eprintln!(
            "rank {rank}: {:.0} MB of weights, peak {:.0} MB while loading ({:+.0} MB beyond share + largest tensor; whole model {:.0} MB)",
            *share as f64 / 1e6,
            peak as f64 / 1e6,
            beyond as f64 / 1e6,
            whole as f64 / 1e6
        );
        assert!(
            peak < *share as u64 + largest + BASELINE,
            "rank {rank}: peak {peak}"
        );
        assert!(
            peak < whole / 2,
            "rank {rank}: peak {peak} of a {whole}-byte model"
        );
    }
    let procs = smollm2_passes(&mut model);
    assert_eq!(
        single[2].keys().filter(|n| n.ends_with("_grad")).count(),
        common::gradient_points(30)
    );
    assert_matches_single(
        "smollm2 procs tp=3 pp=2 dp=2",
        &single[0],
        &procs[0],
        TOLERANCE,
        false,
    );
    assert_matches_single(
        "smollm2 procs edited",
        &single[1],
        &procs[1],
        TOLERANCE,
        false,
    );
    assert_matches_single(
        "smollm2 procs gradients (edited)",
        &single[2],
        &procs[2],
        GRADIENT_TOLERANCE,
        false,
    );
}
