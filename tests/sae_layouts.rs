//! SAEs spliced into a sharded model: every layout equals the single shard (the latents
//! split unevenly over three tensor-parallel ranks, a global top-k), the error term
//! leaves the model's outputs as they were, latent edits, gradients through the SAE
//! against finite differences, and attachments that cannot be made refused by name.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{active_per_position, assert_matches_single, batch, rel_error, take_last_calls};
use flexmodel::models::LlamaConfig;
use flexmodel::runtime::Placement;
use flexmodel::sae::SaeAttachment;
use flexmodel::tiny::{random_checkpoint, tiny_config, write_random_sae};
use flexmodel::{Checkpoint, FlexModel, HookFunction, edits};
use flexmodel_cluster::Layout;

/// The tiny model with 6 heads, 3 key/value heads and a vocabulary of 264: its heads,
/// MLP and vocabulary split over 2 or 3 tensor-parallel ranks.
fn config() -> LlamaConfig {
    LlamaConfig {
        d_model: 48,
        n_heads: 6,
        n_kv_heads: 3,
        d_head: 8,
        vocab_size: 264,
        ..tiny_config()
    }
}

/// Latents per SAE: 100 split over 3 ranks is 34, 33, 33.
const D_SAE: usize = 100;
const TOPK_HOST: &str = "blocks.1.hook_resid_post";
const JUMPRELU_HOST: &str = "blocks.2.hook_mlp_out";

/// A top-k SAE at block 1's residual stream and a JumpReLU SAE at block 2's MLP output.
fn write_saes(dir: &Path) -> Vec<SaeAttachment> {
    let d_in = config().d_model;
    let topk = dir.join("topk");
    write_random_sae(&topk, "topk", (d_in, D_SAE), 7, TOPK_HOST, 1).unwrap();
    let jumprelu = dir.join("jumprelu");
    write_random_sae(&jumprelu, "jumprelu", (d_in, D_SAE), 0, JUMPRELU_HOST, 2).unwrap();
    vec![
        SaeAttachment::new(topk, TOPK_HOST),
        SaeAttachment::new(jumprelu, JUMPRELU_HOST),
    ]
}

fn tokens() -> Tensor {
    batch(&[
        &[5, 17, 200, 3, 99, 1, 40],
        &[1, 2, 3, 4, 5, 6, 7],
        &[250, 0, 7, 7, 7, 9, 263],
        &[12, 13, 14, 15, 16, 17, 18],
    ])
}

fn build(checkpoint: &Checkpoint, layout: Layout, saes: &[SaeAttachment]) -> FlexModel {
    FlexModel::build_with_saes(checkpoint, layout, &Placement::Threads, saes).unwrap()
}

/// The latent edits of these tests: latent 5 of the top-k SAE clamped to 3 and latent
/// 40 of the JumpReLU SAE zeroed.
fn register_latent_edits(model: &mut FlexModel) {
    let hooks = model.hooks_mut();
    let clamp = HookFunction::new(format!("{TOPK_HOST}.hook_sae_acts_post"))
        .with_edit(edits::clamp_latent(5, 3.0));
    hooks.register(clamp.without_capture()).unwrap();
    let zero = HookFunction::new(format!("{JUMPRELU_HOST}.hook_sae_acts_post"))
        .with_edit(edits::clamp_latent(40, 0.0));
    hooks.register(zero.without_capture()).unwrap();
}

/// Every point's value (and the logits) of an edited pass, and every gradient (and the
/// loss) of an edited forward and backward pass.
fn passes(model: &mut FlexModel) -> [BTreeMap<String, Tensor>; 2] {
    register_latent_edits(model);
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    let logits = model.forward(tokens()).unwrap();
    let mut values = take_last_calls(model);
    values.insert("logits".into(), logits);
    model.hooks_mut().clear();
    register_latent_edits(model);
    model
        .hooks_mut()
        .register(HookFunction::backward("*"))
        .unwrap();
    let (_, loss) = model.forward_backward(tokens()).unwrap();
    let mut grads = take_last_calls(model);
    grads.insert("loss".into(), Tensor::new(&[loss], &Device::Cpu).unwrap());
    [values, grads]
}

/// Relative error allowed between a layout and the single shard: the worst measured is
/// 7.0e-7 for values (tp=6) and 1.1e-6 for gradients (tp=3).
const VALUES_TOLERANCE: f64 = 5e-6;
const GRADIENTS_TOLERANCE: f64 = 1e-5;

#[test]
fn every_layout_with_saes_equals_the_single_shard_latents_split_over_three_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let saes = write_saes(dir.path());
    let checkpoint = random_checkpoint(config(), 5).unwrap();
    let [values, grads] = passes(&mut build(&checkpoint, Layout::SINGLE, &saes));
    // Captures see a point's value before its edits: the top-k keeps 7 latents a
    // position.
    let post = &values[&format!("{TOPK_HOST}.hook_sae_acts_post")];
    assert_eq!(post.dims(), [4, 7, D_SAE]);
    assert!(active_per_position(post).iter().all(|&n| n == 7.0));
    // The edits change the logits, which the SAEs alone (error term on) do not.
    let plain = build(&checkpoint, Layout::SINGLE, &[])
        .forward(tokens())
        .unwrap();
    let edited = rel_error(&values["logits"], &plain);
    assert!(
        edited > 1e-3,
        "the latent edits change the logits by {edited:.2e}"
    );
    assert!(grads.contains_key(&format!("{TOPK_HOST}.hook_sae_acts_post_grad")));
    for (tp, pp, dp, fsdp) in [
        (3, 1, 1, false),
        (3, 2, 1, false),
        (6, 1, 1, false),
        (1, 2, 2, true),
        (3, 1, 2, false),
    ] {
        let layout = Layout::new(dp, pp, tp).unwrap().with_fsdp(fsdp).unwrap();
        let [v, g] = passes(&mut build(&checkpoint, layout, &saes));
        let label = format!("tp={tp} pp={pp} dp={dp} fsdp={fsdp}");
        assert_matches_single(&label, &values, &v, VALUES_TOLERANCE, false);
        assert_matches_single(&label, &grads, &g, GRADIENTS_TOLERANCE, false);
    }
}

#[test]
fn with_the_error_term_the_logits_are_the_models_and_without_it_the_reconstructions() {
    let dir = tempfile::tempdir().unwrap();
    let saes = write_saes(dir.path());
    let checkpoint = random_checkpoint(config(), 6).unwrap();
    let plain = build(&checkpoint, Layout::SINGLE, &[])
        .forward(tokens())
        .unwrap();
    for layout in [Layout::SINGLE, Layout::new(1, 1, 3).unwrap()] {
        let mut model = build(&checkpoint, layout, &saes);
        let spliced = model.forward(tokens()).unwrap();
        let err = rel_error(&spliced, &plain);
        eprintln!("error term on, {layout}: logits differ by {err:.2e}");
        assert!(err < 1e-6, "{err}");
    }
    // Without the error term the model continues with each SAE's reconstruction.
    let recons_only: Vec<_> = saes
        .iter()
        .map(|s| s.clone().without_error_term())
        .collect();
    let mut model = build(&checkpoint, Layout::new(1, 1, 3).unwrap(), &recons_only);
    for sae in &saes {
        for site in ["hook_sae_output", "hook_sae_recons"] {
            let name = format!("{}.{site}", sae.hook);
            model.hooks_mut().register(HookFunction::new(name)).unwrap();
        }
        let next = format!("{}.hook_sae_error", sae.hook);
        model.hooks_mut().register(HookFunction::new(next)).unwrap();
    }
    let replaced = model.forward(tokens()).unwrap();
    assert!(
        rel_error(&replaced, &plain) > 1e-2,
        "the SAEs change the model"
    );
    let store = model.store();
    for sae in &saes {
        let output = store
            .last(&format!("{}.hook_sae_output", sae.hook))
            .unwrap();
        let recons = store
            .last(&format!("{}.hook_sae_recons", sae.hook))
            .unwrap();
        assert_eq!(rel_error(output, recons), 0.0, "no normalization to undo");
        let error = format!("{}.hook_sae_error", sae.hook);
        assert!(store.last(&error).is_none(), "no error term, no {error}");
    }
}

#[test]
fn the_gradient_at_a_latent_equals_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    // The top-k SAE alone: a JumpReLU further on would make the loss jump wherever a
    // latent crosses its threshold.
    let saes = &write_saes(dir.path())[..1];
    let checkpoint = random_checkpoint(config(), 7).unwrap();
    let mut model = build(&checkpoint, Layout::new(1, 1, 3).unwrap(), saes);
    let latents = format!("{TOPK_HOST}.hook_sae_acts_post");
    model
        .hooks_mut()
        .register(HookFunction::backward(latents.clone()))
        .unwrap();
    model
        .hooks_mut()
        .register(HookFunction::new(latents.clone()))
        .unwrap();
    model.forward_backward(tokens()).unwrap();
    let grad = model
        .store()
        .last(&format!("{latents}_grad"))
        .unwrap()
        .clone();
    let post = model.store().last(&latents).unwrap().clone();
    model.hooks_mut().clear();
    // The loss as one active latent of one position moves by ±h (top-k keeps it
    // active: it stays among the largest).
    let (b, t) = (1, 3);
    let row = post.get(b).unwrap().get(t).unwrap();
    let values = row.to_vec1::<f32>().unwrap();
    let latent = (0..D_SAE)
        .max_by(|&i, &j| values[i].total_cmp(&values[j]))
        .unwrap();
    let h = 1e-2f32;
    let mut loss_at = |delta: f32| {
        model.hooks_mut().clear();
        let edit = move |_: &mut flexmodel::HookCtx<'_>, x: Tensor| {
            let mut bump = vec![0f32; 4 * 7 * D_SAE];
            bump[(b * 7 + t) * D_SAE + latent] = delta;
            let bump = Tensor::from_vec(bump, (4, 7, D_SAE), x.device())?;
            Ok(x.add(&bump)?)
        };
        let hook = HookFunction::new(latents.clone()).with_edit(edit);
        model.hooks_mut().register(hook.without_capture()).unwrap();
        model.forward_backward(tokens()).unwrap().1
    };
    let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * h);
    let analytic = grad
        .get(b)
        .unwrap()
        .get(t)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[latent];
    let err = (numeric - analytic).abs() / analytic.abs().max(1e-3);
    eprintln!("latent {latent}: analytic {analytic:.6e}, numeric {numeric:.6e}, error {err:.2e}");
    assert!(err < 2e-2, "{analytic} vs {numeric}");
}

#[test]
fn attachments_that_cannot_be_made_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let saes = write_saes(dir.path());
    let checkpoint = random_checkpoint(config(), 8).unwrap();
    let topk_dir = saes[0].dir.clone();
    let refused = |sae: SaeAttachment| {
        FlexModel::build_with_saes(&checkpoint, Layout::SINGLE, &Placement::Threads, &[sae])
            .err()
            .expect("refused")
            .to_string()
    };
    let error = refused(SaeAttachment::new(&topk_dir, "blocks.1.attn.hook_z"));
    assert!(
        error.contains("blocks.1.attn.hook_z") && error.contains("[b, t, d_model]"),
        "{error}"
    );
    let error = refused(SaeAttachment::new(&topk_dir, "blocks.9.hook_resid_post"));
    assert!(error.contains("blocks.9.hook_resid_post"), "{error}");
    let error = refused(SaeAttachment::new(dir.path().join("nowhere"), TOPK_HOST));
    assert!(
        error.contains("nowhere") && error.contains("cfg.json"),
        "{error}"
    );
    let wide = dir.path().join("wide");
    write_random_sae(&wide, "standard", (64, 10), 0, TOPK_HOST, 3).unwrap();
    let error = refused(SaeAttachment::new(&wide, TOPK_HOST));
    assert!(
        error.contains("d_in = 64") && error.contains("d_model = 48"),
        "{error}"
    );
    let twice = [saes[0].clone(), saes[0].clone()];
    let error =
        FlexModel::build_with_saes(&checkpoint, Layout::SINGLE, &Placement::Threads, &twice)
            .err()
            .expect("refused")
            .to_string();
    assert!(error.contains("spliced there already"), "{error}");
    assert!("no-at-sign".parse::<SaeAttachment>().is_err());

    // A latent edit outside the latents, or on a point without latents, says so.
    let mut model = build(&checkpoint, Layout::SINGLE, &saes);
    let latents = format!("{TOPK_HOST}.hook_sae_acts_post");
    let out_of_range = HookFunction::new(latents).with_edit(edits::clamp_latent(D_SAE, 1.0));
    model.hooks_mut().register(out_of_range).unwrap();
    let error = model.forward(tokens()).unwrap_err().to_string();
    assert!(
        error.contains("latent 100 does not exist") && error.contains("100 latents"),
        "{error}"
    );
    model.hooks_mut().clear();
    let no_latents = HookFunction::new(TOPK_HOST).with_edit(edits::clamp_latent(1, 0.0));
    model.hooks_mut().register(no_latents).unwrap();
    let error = model.forward(tokens()).unwrap_err().to_string();
    assert!(
        error.contains("zero-latent") && error.contains("is not an SAE's latents"),
        "{error}"
    );
}
