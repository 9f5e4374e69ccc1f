//! FSDP (`Layout::with_fsdp`, `--fsdp`): the replicas of each shard hold one piece each
//! of its parameters and gather a layer's whole slices just before it computes. Hooks,
//! edits, gradients at hook points and at parameters, and trainables give the plain
//! data-parallel run's results bit for bit and the single shard's within its tolerance,
//! in-process, in worker processes and over a job's workers; at dp = 2 a rank holds half
//! its plain share, and a worker's peak memory shows it.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use candle_core::{Tensor, Var};
use common::cli::{flexmodel, succeeded, tensors, tiny_dir};
use common::etcd::{TestJob, all_members_are};
use common::parity::{
    everything, parity_tokens, register_edits, tiny_for_tp3_on_disk, tiny_on_disk,
};
use common::processes::wait_until;
use common::{assert_matches_single, smollm2, smollm2_passes, smollm2_tokens};
use flexmodel::runtime::Placement;
use flexmodel::{Checkpoint, FlexModel};
use flexmodel_cluster::Layout;
use flexmodel_cluster::membership::MemberState;

/// As in `worker_processes.rs`: the layouts' worst relative error against the single
/// shard is 7.8e-7 (tiny model).
const TOLERANCE: f64 = 5e-6;
/// As in `sharded_smollm2.rs`: the worst measured is 3.1e-6 at a point, 3.4e-5 at a
/// gradient (tp=3, edited).
const SMOLLM2_TOLERANCE: f64 = 2e-5;
const SMOLLM2_GRADIENT_TOLERANCE: f64 = 1e-4;

/// `(tp, pp, dp)` as in the issue, without FSDP.
fn plain(tp: usize, pp: usize, dp: usize) -> Layout {
    Layout::new(dp, pp, tp).unwrap()
}

/// `(tp, pp, dp)` as in the issue, with FSDP.
fn fsdp(tp: usize, pp: usize, dp: usize) -> Layout {
    plain(tp, pp, dp).with_fsdp(true).unwrap()
}

fn processes() -> Placement {
    common::parity::worker_processes()
}

/// Every parameter and its gradient after a forward and backward pass with edits on
/// values and on gradients and a trainable.
fn parameters(
    checkpoint: &Checkpoint,
    layout: Layout,
    placement: &Placement,
) -> BTreeMap<String, Tensor> {
    let mut model = FlexModel::build_on(checkpoint, layout, placement).unwrap();
    let steer = Var::zeros(
        checkpoint.config.d_model(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    register_edits(&mut model, &steer);
    model.forward_backward(parity_tokens()).unwrap();
    let mut all = BTreeMap::new();
    for name in model.parameter_names().unwrap() {
        all.insert(format!("{name}.grad"), model.parameter_grad(&name).unwrap());
        all.insert(name.clone(), model.parameter(&name).unwrap());
    }
    all
}

#[test]
fn fsdp_gives_plain_data_parallels_results_bit_for_bit_in_threads_and_worker_processes() {
    let (_tp3_dir, tp3) = tiny_for_tp3_on_disk(61);
    let (_dir, tiny) = tiny_on_disk(62);
    for (checkpoint, (tp, pp, dp)) in [(&tp3, (3, 1, 2)), (&tiny, (1, 2, 2))] {
        let single = everything(checkpoint, Layout::SINGLE, &Placement::Threads);
        let data_parallel = everything(checkpoint, plain(tp, pp, dp), &Placement::Threads);
        let layout = fsdp(tp, pp, dp);
        let threads = everything(checkpoint, layout, &Placement::Threads);
        let procs = everything(checkpoint, layout, &processes());
        // The gathered weights are the whole ones, and a parameter's gradient is the sum
        // of the two replicas' in either case.
        assert_matches_single(&format!("{layout}"), &data_parallel, &threads, 0.0, true);
        assert_matches_single(&format!("procs {layout}"), &threads, &procs, 0.0, true);
        let label = format!("{layout} vs single");
        assert_matches_single(&label, &single, &threads, TOLERANCE, false);
    }
}

#[test]
fn every_parameter_and_its_gradient_under_fsdp_equals_the_single_shards() {
    let (_tp3_dir, tp3) = tiny_for_tp3_on_disk(63);
    let (_dir, tiny) = tiny_on_disk(64);
    for (checkpoint, (tp, pp, dp)) in [(&tp3, (3, 1, 2)), (&tiny, (1, 2, 2)), (&tiny, (2, 1, 3))] {
        let single = parameters(checkpoint, Layout::SINGLE, &Placement::Threads);
        let data_parallel = parameters(checkpoint, plain(tp, pp, dp), &Placement::Threads);
        let layout = fsdp(tp, pp, dp);
        let threads = parameters(checkpoint, layout, &Placement::Threads);
        assert_matches_single(&format!("{layout}"), &single, &threads, TOLERANCE, false);
        // The replicas' gradients are added in their order either way.
        let label = format!("{layout} vs plain");
        assert_matches_single(&label, &data_parallel, &threads, 0.0, true);
    }
    let layout = fsdp(1, 2, 2);
    let threads = parameters(&tiny, layout, &Placement::Threads);
    let procs = parameters(&tiny, layout, &processes());
    assert_matches_single(&format!("procs {layout}"), &threads, &procs, 0.0, true);
}

#[test]
fn at_two_replicas_each_rank_holds_half_its_plain_share_of_the_weights() {
    let (_tp3_dir, tp3) = tiny_for_tp3_on_disk(65);
    let (_dir, tiny) = tiny_on_disk(66);
    for (checkpoint, (tp, pp, dp)) in [(&tp3, (3, 1, 2)), (&tiny, (1, 2, 2))] {
        let shares = |layout| {
            FlexModel::build(checkpoint, layout)
                .unwrap()
                .shard_weight_bytes()
        };
        let (whole, pieces) = (shares(plain(tp, pp, dp)), shares(fsdp(tp, pp, dp)));
        for (rank, (w, p)) in whole.iter().zip(&pieces).enumerate() {
            // Every dimension the pieces are cut along is even in these models.
            assert_eq!(2 * p, *w, "rank {rank}: {p} bytes of {w}");
        }
    }
}

#[test]
fn fsdp_needs_replicas_and_says_so() {
    let dir = tiny_dir(67);
    let model = dir.path().to_str().unwrap();
    let out = flexmodel(&["hooks", "--model", model, "--tp", "2", "--fsdp"]);
    // Exit 1, as every layout the model or the machine cannot take.
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "bad layout: --fsdp shards parameters across data-parallel replicas, but dp=1; give --dp 2 or more"
        ),
        "{stderr}"
    );
}

#[test]
fn a_capture_with_fsdp_writes_what_plain_data_parallel_writes() {
    let dir = tiny_dir(68);
    let model = dir.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let tokens = out.path().join("tokens.txt");
    std::fs::write(&tokens, "5 17 200 3 99 1\n250 0 7 7\n1 2 3\n").unwrap();
    let capture = |extra: &[&str]| {
        let file = out
            .path()
            .join(format!("capture{}.safetensors", extra.len()));
        let mut args = vec![
            "capture",
            "--model",
            model,
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--hook",
            "*",
            "--grad",
            "--edit",
            "blocks.1.attn.hook_z=zero-head:3",
            "--out",
            file.to_str().unwrap(),
            "--tp",
            "2",
            "--dp",
            "2",
        ];
        args.extend(extra);
        succeeded(&args);
        tensors(&file)
    };
    let data_parallel = capture(&[]);
    assert!(data_parallel.len() > 100, "{} tensors", data_parallel.len());
    assert_eq!(capture(&["--fsdp"]), data_parallel);
    assert_eq!(capture(&["--fsdp", "--procs"]), data_parallel);
}

#[test]
fn induction_scores_with_fsdp_are_plain_data_parallels() {
    let dir = tiny_dir(70);
    let model = dir.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let scores = |extra: &[&str]| {
        let dir = out.path().join(format!("induction{}", extra.len()));
        let mut args = vec![
            "induction",
            "--model",
            model,
            "--seq-len",
            "20",
            "--batch",
            "3",
            "--seed",
            "3",
            "--out",
            dir.to_str().unwrap(),
            "--dp",
            "2",
        ];
        args.extend(extra);
        succeeded(&args);
        tensors(&dir.join("induction_scores.safetensors"))
    };
    let data_parallel = scores(&[]);
    assert!(!data_parallel.is_empty());
    assert_eq!(scores(&["--fsdp"]), data_parallel);
}

#[test]
fn a_jobs_workers_serve_fsdp_bit_for_bit_keep_its_pieces_for_the_next_driver_and_reload_without_it()
{
    let job = TestJob::start("fsdp", 1, 4);
    let (_dir, checkpoint) = tiny_on_disk(69);
    let layout = fsdp(1, 2, 2);
    let threads = everything(&checkpoint, layout, &Placement::Threads);
    let first = everything(&checkpoint, layout, &job.placement());
    assert_matches_single("cluster fsdp", &threads, &first, 0.0, true);
    let ready = || {
        wait_until("every worker to be ready", Duration::from_secs(5), || {
            all_members_are(&job.url, MemberState::Ready)
        })
    };
    ready();
    // The pieces serve the next FSDP driver through its own groups; a plain layout's
    // slices are other slices, loaded anew.
    let second = FlexModel::build_on(&checkpoint, layout, &job.placement()).unwrap();
    assert_eq!(second.workers_reused(), Some(vec![true; 4]));
    drop(second);
    let again = everything(&checkpoint, layout, &job.placement());
    assert_matches_single("second fsdp driver", &threads, &again, 0.0, true);
    ready();
    let plain_layout = plain(1, 2, 2);
    let model = FlexModel::build_on(&checkpoint, plain_layout, &job.placement()).unwrap();
    assert_eq!(model.workers_reused(), Some(vec![false; 4]));
}

#[test]
fn smollm2_workers_under_fsdp_hold_half_the_weights_and_peak_lower() {
    let (checkpoint, _) = smollm2();
    let peaks = |model: &FlexModel| -> Vec<u64> {
        let peaks = model.worker_peak_rss_bytes().unwrap();
        peaks.into_iter().map(Option::unwrap).collect()
    };
    let worker = |layout: Layout| {
        let mut model = FlexModel::build_on(checkpoint, layout, &processes()).unwrap();
        let loaded = peaks(&model);
        model.forward(smollm2_tokens()).unwrap();
        (model.shard_weight_bytes(), loaded, peaks(&model))
    };
    let plain_run = worker(plain(1, 1, 2));
    let fsdp_run = worker(fsdp(1, 1, 2));
    let mb = |b: u64| b as f64 / 1e6;
    for rank in 0..2 {
        let bytes = (fsdp_run.0[rank] as u64, plain_run.0[rank] as u64);
        let loaded = (fsdp_run.1[rank], plain_run.1[rank]);
        let passed = (fsdp_run.2[rank], plain_run.2[rank]);
        let ratio = |(a, b): (u64, u64)| a as f64 / b as f64;
        eprintln!(
            "rank {rank}: weights {:.0} of {:.0} MB; peak {:.0} of {:.0} MB loaded ({:.3}), {:.0} of {:.0} MB after a pass ({:.3})",
            mb(bytes.0),
            mb(bytes.1),
            mb(loaded.0),
            mb(loaded.1),
            ratio(loaded),
            mb(passed.0),
            mb(passed.1),
            ratio(passed)
        );
        // Every dimension SmolLM2's pieces are cut along is even: exactly half.
        assert_eq!(2 * bytes.0, bytes.1);
        // Measured 0.56: each layer is cut as it is read.
        assert!(
            ratio(loaded) < 0.65,
            "rank {rank}: loading peaks at {loaded:?}"
        );
        // Measured 0.84 to 0.91: one whole layer at a time beside the pieces (the embedding and
        // the LM head are a fifth of SmolLM2); the plain pass's own peak fell when attention
        // stopped repeating the keys and values, so the ratio rose from 0.84–0.87.
        assert!(
            ratio(passed) < 0.95,
            "rank {rank}: a pass peaks at {passed:?}"
        );
    }
}

/// [`smollm2_passes`] under `layout` on `placement`, with five parameters' gradients
/// after the edited backward pass; and the model.
fn smollm2_passes_with_parameters(
    layout: Layout,
    placement: &Placement,
) -> ([BTreeMap<String, Tensor>; 3], FlexModel) {
    let (checkpoint, _) = smollm2();
    let mut model = FlexModel::build_on(checkpoint, layout, placement).unwrap();
    let [unedited, edited, mut grads] = smollm2_passes(&mut model);
    for name in [
        "model.embed_tokens.weight",
        "model.layers.7.self_attn.o_proj.weight",
        "model.layers.22.mlp.gate_proj.weight",
        "model.layers.29.post_attention_layernorm.weight",
        "model.norm.weight",
    ] {
        grads.insert(format!("{name}.grad"), model.parameter_grad(name).unwrap());
    }
    ([unedited, edited, grads], model)
}

#[test]
fn smollm2_under_fsdp_matches_the_single_shard_at_every_hook_point_and_gradient() {
    let (single, _) = smollm2_passes_with_parameters(Layout::SINGLE, &Placement::Threads);
    let points = common::default_points(30);
    assert_eq!(
        single[0].len(),
        points + 1,
        "every hook point and the logits"
    );
    for (layout, placement) in [
        (fsdp(3, 1, 2), Placement::Threads),
        (fsdp(1, 2, 2), processes()),
    ] {
        let (sharded, model) = smollm2_passes_with_parameters(layout, &placement);
        let kinds = ["plain", "edited", "gradients"];
        for ((kind, expected), actual) in kinds.iter().zip(&single).zip(&sharded) {
            let tolerance = match *kind {
                "gradients" => SMOLLM2_GRADIENT_TOLERANCE,
                _ => SMOLLM2_TOLERANCE,
            };
            let label = format!("smollm2 {layout} {kind}");
            assert_matches_single(&label, expected, actual, tolerance, false);
        }
        if let Some(peaks) = model.worker_peak_rss_bytes() {
            let mb: Vec<f64> = peaks.iter().map(|p| p.unwrap() as f64 / 1e6).collect();
            eprintln!("smollm2 {layout}: workers' peak memory {mb:.0?} MB");
        }
    }
}
