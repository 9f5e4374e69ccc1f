//! SAEs made by SAELens itself, spliced into SmolLM2 here: a standard SAE trained by
//! SAELens's trainer on a `flexmodel cache` dataset of `blocks.6.hook_resid_post`, and
//! top-k and JumpReLU SAEs built with SAELens's classes (random weights, its
//! normalizations and options). Every `hook_sae_*` point equals SAELens's own pass
//! (`SAE.run_with_cache` on the same activations), single shard and with the latents
//! split over three tensor-parallel ranks; a clamped latent changes greedy generation
//! as the same clamp does in SAELens's `HookedSAETransformer` on TransformerLens's
//! SmolLM2.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use common::child::{OutputWithin, RUN_DEADLINE};
use common::cli::succeeded;
use common::{rel_error, shakespeare_path, smollm2};
use flexmodel::runtime::Placement;
use flexmodel::sae::SaeAttachment;
use flexmodel::{FlexModel, GenerateOptions, HookFunction, Layout, edits};

const HOOK: &str = "blocks.6.hook_resid_post";

/// Runs a script of `tests/reference/` with TransformerLens's Python (where SAELens is
/// installed); its standard output.
fn python(script: &str, args: &[&str]) -> String {
    let python = common::transformer_lens_python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(script);
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("WANDB_MODE", "disabled")
        .output_within(RUN_DEADLINE);
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The SAEs of these tests in `dir`: SAELens's trained standard SAE, and random ones of
/// each other architecture with SAELens's options that change the math.
fn saelens_saes(dir: &Path) -> Vec<(String, PathBuf)> {
    let dataset = dir.join("dataset");
    succeeded(&[
        "cache",
        "--model",
        "smollm2",
        "--text",
        text(&shakespeare_path()),
        "--hook",
        HOOK,
        "--max-tokens",
        "32768",
        "--seq-len",
        "128",
        "--batch",
        "16",
        "--stop-at-layer",
        "7",
        "--logits",
        "none",
        "--out",
        text(&dataset),
    ]);
    let mut saes = Vec::new();
    let trained = dir.join("standard");
    python(
        "saelens_sae.py",
        &[
            "train",
            text(&dataset),
            HOOK,
            text(&trained),
            "--steps",
            "300",
            "--d-sae",
            "1152",
        ],
    );
    saes.push(("standard, trained".to_string(), trained));
    let random = [
        ("topk", serde_json::json!({"arch": "topk", "k": 24})),
        (
            "topk-rescaled",
            serde_json::json!({"arch": "topk", "k": 24, "rescale_acts_by_decoder_norm": true}),
        ),
        (
            "topk-layer-norm",
            serde_json::json!({"arch": "topk", "k": 24, "normalize_activations": "layer_norm"}),
        ),
        (
            "jumprelu",
            serde_json::json!({"arch": "jumprelu", "apply_b_dec_to_input": true}),
        ),
        (
            "standard-rescaled",
            serde_json::json!({"arch": "standard", "normalize_activations": "constant_norm_rescale"}),
        ),
    ];
    let specs: Vec<serde_json::Value> = random
        .iter()
        .enumerate()
        .map(|(seed, (name, spec))| {
            let mut spec = spec.clone();
            let out = dir.join(name);
            spec["out"] = text(&out).into();
            spec["d_in"] = 576.into();
            spec["d_sae"] = 1152.into();
            spec["seed"] = seed.into();
            saes.push((name.to_string(), out));
            spec
        })
        .collect();
    let specs_path = dir.join("random.json");
    std::fs::write(&specs_path, serde_json::to_string(&specs).unwrap()).unwrap();
    python("saelens_sae.py", &["random", text(&specs_path)]);
    saes
}

/// SmolLM2 with `sae` at [`HOOK`] over `layout`, every point of the SAE captured.
fn spliced(sae: &Path, layout: Layout) -> FlexModel {
    let (checkpoint, _) = smollm2();
    let attachment = SaeAttachment::new(sae, HOOK);
    let mut model =
        FlexModel::build_with_saes(checkpoint, layout, &Placement::Threads, &[attachment]).unwrap();
    let all = format!("{HOOK}.hook_sae_*");
    model.hooks_mut().register(HookFunction::new(all)).unwrap();
    model
}

fn prompts() -> Tensor {
    let (checkpoint, _) = smollm2();
    let ids = |text: &str| checkpoint.tokenizer.encode(text).unwrap();
    let (a, b) = (
        ids("To be, or not to be, that is the"),
        ids("The capital of France is Paris, and"),
    );
    let t = a.len().min(b.len());
    let rows: Vec<u32> = a[..t].iter().chain(&b[..t]).copied().collect();
    Tensor::from_vec(rows, (2, t), &Device::Cpu).unwrap()
}

/// Each point of our SAE's pass and what of SAELens's it equals: its `encode` and the
/// points of its `run_with_cache` (error term on).
const COMPARED: [(&str, &str); 7] = [
    ("hook_sae_input", "hook_sae_input"),
    ("hook_sae_acts_pre", "hook_sae_acts_pre"),
    ("hook_sae_acts_post", "encode"),
    ("hook_sae_acts_post", "hook_sae_acts_post"),
    ("hook_sae_recons", "hook_sae_recons"),
    ("hook_sae_error", "hook_sae_error"),
    ("hook_sae_output", "hook_sae_output"),
];

/// Relative error allowed against SAELens (the bound): the worst measured is
/// 1.5e-6, the trained SAE's error term under tp=3.
const TOLERANCE: f64 = 1e-5;

#[test]
fn saelens_saes_equal_saelens_at_every_point_and_steer_generation_as_hooked_sae_transformer() {
    let dir = tempfile::tempdir().unwrap();
    let saes = saelens_saes(dir.path());
    let tokens = prompts();
    // Every SAE reads the same activations: SmolLM2's at the hook.
    let mut runs = Vec::new();
    for (name, sae) in &saes {
        let mut single = spliced(sae, Layout::SINGLE);
        single.forward(&tokens).unwrap();
        let mut split = spliced(sae, Layout::new(1, 1, 3).unwrap());
        split.forward(&tokens).unwrap();
        runs.push((name, sae, single.store().clone(), split.store().clone()));
    }
    let input = runs[0].2.last(&format!("{HOOK}.hook_sae_input")).unwrap();
    let acts = dir.path().join("acts.safetensors");
    candle_core::safetensors::save(&[("acts", input.clone())].into(), &acts).unwrap();
    let mut args = vec!["encode", text(&acts), text(dir.path())];
    args.extend(saes.iter().map(|(_, sae)| text(sae)));
    python("saelens_sae.py", &args);
    let mut worst = 0f64;
    for (name, sae, single, split) in &runs {
        let file = sae.file_name().unwrap().to_str().unwrap();
        let theirs_path = dir.path().join(format!("{file}.safetensors"));
        let theirs = candle_core::safetensors::load(&theirs_path, &Device::Cpu).unwrap();
        for (ours, theirs_name) in COMPARED {
            let key = format!("{HOOK}.{ours}");
            let expected = &theirs[theirs_name];
            for (layout, store) in [("single", single), ("tp=3", split)] {
                let err = rel_error(store.last(&key).unwrap(), expected);
                eprintln!("{name} {layout} {ours} against SAELens {theirs_name}: {err:.2e}");
                assert!(err < TOLERANCE, "{name} {layout} {ours}: {err:.3e}");
                worst = worst.max(err);
            }
        }
    }
    eprintln!("worst relative error against SAELens: {worst:.2e}");

    // Greedy generation with the trained SAE, one latent clamped, as SAELens's
    // HookedSAETransformer generates it on TransformerLens's SmolLM2.
    let (checkpoint, _) = smollm2();
    let hf_dir = dir.path().join("smollm2");
    checkpoint.save_hf_dir(&hf_dir).unwrap();
    let trained = &saes[0].1;
    let prompt = checkpoint.tokenizer.encode("The weather today is").unwrap();
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let latent = 7;
    let value = 60.0;
    let mut model = spliced(trained, Layout::new(1, 1, 3).unwrap());
    model.hooks_mut().clear();
    let options = GenerateOptions {
        max_new_tokens: 8,
        stop_at_eos: false,
        ..GenerateOptions::default()
    };
    let plain = model.generate(&[&prompt], &options).unwrap();
    let clamp = HookFunction::new(format!("{HOOK}.hook_sae_acts_post"))
        .with_edit(edits::clamp_latent(latent, value))
        .without_capture();
    model.hooks_mut().register(clamp).unwrap();
    let clamped = model.generate(&[&prompt], &options).unwrap();
    let ours_plain = plain.sequences[0].clone();
    let ours_clamped = clamped.sequences[0].clone();
    assert_ne!(ours_plain, ours_clamped, "the clamp changes the generation");
    let clamp = format!("{latent}:{value}");
    let prompt_ids = ids.join(" ");
    let out = python(
        "saelens_generate.py",
        &[
            text(&hf_dir),
            text(trained),
            HOOK,
            &prompt_ids,
            "8",
            "--clamp",
            &clamp,
        ],
    );
    let theirs: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let tokens = |key: &str| -> Vec<u32> { serde_json::from_value(theirs[key].clone()).unwrap() };
    assert_eq!(ours_plain, tokens("tokens"));
    assert_eq!(ours_clamped, tokens("clamped"));
}
