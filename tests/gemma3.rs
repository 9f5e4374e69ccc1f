//! Gemma 3 270M (the Q4_K_M GGUF, dequantized to f32) against Hugging Face transformers'
//! own `Gemma3ForCausalLM` on the same weights written as a Hugging Face directory (the
//! virtual environment `scripts/test` installs): every hook point transformers shows,
//! in a plain and a ragged batch and over a prompt longer than the 512-token window;
//! greedy generation through the key/value cache and recomputed; gradients against
//! finite differences; and every layout against the single shard.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use common::child::{OutputWithin, RUN_DEADLINE};
use common::{assert_matches_single, gemma3, rel_error, take_last_calls, transformer_lens_python};
use flexmodel::text::TokenBatch;
use flexmodel::{FlexModel, GenerateOptions, HookFunction, Layout, edits, next_token_loss};

/// The relative error allowed against transformers at any point (both f32), and
/// between a layout and the single shard: the bound. Measured at most 5.2e-6
/// against transformers (700 tokens) and 3.9e-6 between layouts (tp=2).
const TOLERANCE: f64 = 1e-4;
/// The relative error allowed between a layout's gradients and the single shard's:
/// measured at most 1.2e-4 (tp=4, a norm's `hook_scale`, a sum that cancels).
const GRADIENT_TOLERANCE: f64 = 1e-3;

/// The model written once as a Hugging Face directory (f32 safetensors, 1.1 GB).
fn hf_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        gemma3().0.save_hf_dir(dir.path()).unwrap();
        dir
    })
    .path()
}

/// Runs `tests/reference/hf_gemma3_run.py` with `args` after its mode and directory.
fn transformers(mode: &str, rows: &[Vec<u32>], extra: &str) -> BTreeMap<String, Tensor> {
    let python = transformer_lens_python();
    assert!(
        python.exists(),
        "{} is missing: scripts/test installs transformers into target/transformer-lens",
        python.display()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/hf_gemma3_run.py");
    let out = tempfile::NamedTempFile::new().unwrap();
    let rows: Vec<String> = rows
        .iter()
        .map(|r| r.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
        .collect();
    let run = Command::new(&python)
        .arg(&script)
        .arg(mode)
        .arg(hf_dir())
        .arg(rows.join(";"))
        .arg(out.path())
        .arg(extra)
        .output_within(RUN_DEADLINE);
    assert!(
        run.status.success(),
        "transformers failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    candle_core::safetensors::load(out.path(), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// `text` in Gemma's tokenizer, after its beginning-of-sequence token.
fn tokens(text: &str) -> Vec<u32> {
    gemma3().0.tokenizer.encode(text).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        tokens("Paris is the capital of"),
        tokens("The quick brown fox jumps over the lazy dog, and then it"),
    ]
}

/// Every default point and the logits of one pass over `rows` (left-padded).
fn ours(layout: Layout, rows: &[Vec<u32>]) -> BTreeMap<String, Tensor> {
    let mut model = FlexModel::build(&gemma3().0, layout).unwrap();
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    let logits = model
        .forward(TokenBatch::left_padded(rows).unwrap())
        .unwrap();
    let mut all = take_last_calls(&mut model);
    all.insert("unembed.hook_out".into(), logits);
    all
}

/// Checks every point of transformers' run against ours (padded logits zeroed as
/// transformers' run zeroes them); returns the worst error.
fn assert_matches_transformers(
    label: &str,
    expected: &BTreeMap<String, Tensor>,
    actual: &BTreeMap<String, Tensor>,
) -> f64 {
    let mut worst = (0.0f64, String::new());
    for (name, e) in expected {
        let a = actual
            .get(name)
            .unwrap_or_else(|| panic!("{label}: {name} not captured"))
            .to_dtype(DType::F64)
            .unwrap();
        let a = match name.as_str() {
            "unembed.hook_out" if a.dims() == e.dims() => {
                let real = e.abs().unwrap().sum_keepdim(2).unwrap().gt(0.0).unwrap();
                a.broadcast_mul(&real.to_dtype(DType::F64).unwrap())
                    .unwrap()
            }
            "unembed.hook_out" => a.narrow(1, a.dim(1).unwrap() - 1, 1).unwrap(),
            _ => a,
        };
        let err = rel_error(&a, e);
        assert!(err < TOLERANCE, "{label} {name}: relative error {err:.3e}");
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    eprintln!(
        "{label}: worst relative error {:.2e} at {}",
        worst.0, worst.1
    );
    worst.0
}

#[test]
fn gemma3_matches_transformers_at_every_point_in_plain_and_ragged_batches() {
    let n_layers = 18;
    // Every default point of a Gemma block but the attention scores (transformers shows
    // none): 33 sites less the 2 opt-in head inputs, 2 others opt-in, and the scores.
    let per_block = 33 - 4 - 1;
    for (label, rows) in [("plain", vec![prompts()[0].clone()]), ("ragged", prompts())] {
        let expected = transformers("points", &rows, "all");
        assert_eq!(
            expected.len(),
            1 + per_block * n_layers + 3,
            "{label}: every point"
        );
        let actual = ours(Layout::SINGLE, &rows);
        assert_matches_transformers(&format!("gemma3 {label}"), &expected, &actual);
    }
}

#[test]
fn gemma3_continues_paris_is_the_capital_of_with_france_as_transformers_does() {
    let prompt = tokens("Paris is the capital of");
    assert_eq!(prompt, [2, 50429, 563, 506, 5279, 529]);
    let mut model = FlexModel::build(&gemma3().0, Layout::SINGLE).unwrap();
    let options = GenerateOptions {
        max_new_tokens: 3,
        stop_at_eos: false,
        ..GenerateOptions::default()
    };
    let generation = model.generate(&[prompt], &options).unwrap();
    let text = gemma3()
        .0
        .tokenizer
        .decode(&generation.sequences[0][6..])
        .unwrap();
    assert_eq!(text, " France and is");
}

/// A prompt of `n` tokens: Tiny Shakespeare's opening lines, in Gemma's tokenizer.
fn long_prompt(n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(common::shakespeare_path()).unwrap();
    let mut ids = tokens(&text[..8 * n]);
    ids.truncate(n);
    assert_eq!(ids.len(), n);
    ids
}

#[test]
fn a_prompt_longer_than_the_window_matches_transformers_and_generates_as_it_does() {
    let rows = vec![long_prompt(700)];
    // Every point of the pass (the logits of the last position).
    let expected = transformers("points", &rows, "last");
    let actual = ours(Layout::SINGLE, &rows);
    assert_matches_transformers("gemma3 700 tokens", &expected, &actual);
    // A local layer's queries past the window see 512 keys; a global layer's, all.
    let pattern = |layer: usize| {
        let p = &actual[&format!("blocks.{layer}.attn.hook_pattern")];
        let last = p.narrow(2, 699, 1).unwrap();
        let seen = last.ne(0.0).unwrap().to_dtype(DType::F32).unwrap();
        seen.sum_all().unwrap().to_scalar::<f32>().unwrap() / 4.0
    };
    assert_eq!((pattern(0), pattern(5)), (512.0, 700.0));

    // Greedy generation through the cache (local layers keep only their window) and
    // recomputed, as transformers generates with its own cache and without.
    let n = 12;
    let hf = transformers("generate", &rows, &n.to_string());
    let expected: Vec<u32> = hf["tokens"]
        .flatten_all()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut model = FlexModel::build(&gemma3().0, Layout::SINGLE).unwrap();
    for kv_cache in [true, false] {
        let options = GenerateOptions {
            max_new_tokens: n,
            kv_cache,
            stop_at_eos: false,
            ..GenerateOptions::default()
        };
        let generation = model.generate(&rows, &options).unwrap();
        assert_eq!(
            generation.sequences[0][700..],
            expected,
            "kv_cache = {kv_cache}"
        );
    }
    assert_eq!(rel_error(&hf["recomputed"], &hf["tokens"]), 0.0);
}

/// The next-token loss of `rows` from `logits`, in f64.
fn loss_of(logits: &Tensor, tokens: &Tensor) -> f64 {
    let logits = logits.to_dtype(DType::F64).unwrap();
    next_token_loss(&logits, tokens)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn gradients_at_gemma_points_match_finite_differences() {
    let row = prompts()[1].clone();
    let tokens = Tensor::new(row.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let checkpoint = &gemma3().0;
    let mut model = FlexModel::build(checkpoint, Layout::SINGLE).unwrap();
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    model
        .hooks_mut()
        .register(HookFunction::backward("*"))
        .unwrap();
    model.forward_backward(tokens.clone()).unwrap();
    let captured = take_last_calls(&mut model);
    let norm = |t: &Tensor| {
        let n = t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        n.to_scalar::<f32>().unwrap() as f64
    };
    for point in [
        "hook_embed",
        "blocks.2.ln1_post.hook_normalized",
        "blocks.5.attn.q_norm.hook_normalized",
        "blocks.5.attn.hook_rot_k",
        "blocks.9.ln2_post.hook_scale",
        "blocks.11.mlp.hook_post",
        "blocks.17.hook_attn_out",
        "ln_final.hook_normalized",
    ] {
        let grad = &captured[&format!("{point}_grad")];
        let analytic = norm(grad);
        let direction = (grad / analytic).unwrap();
        // One model for every evaluation: only the edit changes.
        let mut loss_at = |step: f64| {
            model.hooks_mut().clear();
            model.store_mut().clear();
            let delta = (&direction * step).unwrap();
            let add = HookFunction::new(point).with_edit(edits::add(delta));
            model.hooks_mut().register(add).unwrap();
            loss_of(&model.forward(tokens.clone()).unwrap(), &tokens)
        };
        // A step of 1e-4 of the point's own size, so that the change of an f32 loss
        // stands above its rounding; Richardson's extrapolation from h and 2h takes
        // off the h² term of the central differences (the embedding's curvature makes
        // a 1% error of that term at 1e-3).
        let h = 1e-4 * norm(&captured[point]);
        let mut central = |h: f64| (loss_at(h) - loss_at(-h)) / (2.0 * h);
        let numeric = (4.0 * central(h) - central(2.0 * h)) / 3.0;
        let err = (numeric - analytic).abs() / analytic.abs();
        eprintln!(
            "{point}: directional derivative {analytic:.6} vs finite difference {numeric:.6} ({err:.1e})"
        );
        // Measured: at most 4.6e-4 (the query norm), 1.3e-5 at the embedding.
        assert!(err < 1e-3, "{point}: {analytic} vs {numeric}");
    }
}

/// Logits, loss and every capture of one edited pass under `layout`, and apart every
/// gradient.
fn everything(layout: Layout) -> [BTreeMap<String, Tensor>; 2] {
    let mut model = FlexModel::build(&gemma3().0, layout).unwrap();
    let hooks = model.hooks_mut();
    hooks
        .register(HookFunction::new("blocks.3.attn.hook_z").with_edit(edits::zero_head(2)))
        .unwrap();
    hooks
        .register(HookFunction::new("blocks.11.hook_mlp_out").with_edit(edits::scale(0.5)))
        .unwrap();
    hooks.register(HookFunction::new("*")).unwrap();
    hooks.register(HookFunction::backward("*")).unwrap();
    let batch = TokenBatch::left_padded(&prompts()).unwrap();
    let (logits, loss) = model.forward_backward(batch).unwrap();
    let (gradients, mut values): (BTreeMap<_, _>, BTreeMap<_, _>) = take_last_calls(&mut model)
        .into_iter()
        .partition(|(name, _)| name.ends_with("_grad"));
    values.insert("logits".into(), logits);
    values.insert("loss".into(), Tensor::new(&[loss], &Device::Cpu).unwrap());
    [values, gradients]
}

#[test]
fn every_layout_equals_the_single_shard_with_more_ranks_than_key_value_heads() {
    let [values, gradients] = everything(Layout::SINGLE);
    assert_eq!(
        gradients.len(),
        values.len() - 3,
        "every point but hook_tokens"
    );
    let layouts = [
        ("tp=2", Layout::new(1, 1, 2).unwrap()),
        ("tp=4", Layout::new(1, 1, 4).unwrap()),
        ("pp=3", Layout::new(1, 3, 1).unwrap()),
        ("dp=2", Layout::new(2, 1, 1).unwrap()),
        (
            "tp=2 pp=2 dp=2 fsdp",
            Layout::new(2, 2, 2).unwrap().with_fsdp(true).unwrap(),
        ),
    ];
    for (label, layout) in layouts {
        let [sharded_values, sharded_gradients] = everything(layout);
        // Pipeline stages compute the same floats in the same order; data parallelism
        // sums the replicas' losses.
        let exact = label.starts_with("pp");
        let label = format!("gemma3 {label}");
        assert_matches_single(&label, &values, &sharded_values, TOLERANCE, exact);
        let label = format!("{label} gradients");
        let (single, sharded) = (&gradients, &sharded_gradients);
        assert_matches_single(&label, single, sharded, GRADIENT_TOLERANCE, exact);
    }
}

#[test]
fn every_gemma3_point_has_a_transformer_lens_name() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference/transformer_lens_gemma3_names.py");
    let run = Command::new(transformer_lens_python())
        .arg(&script)
        .env("HF_HUB_OFFLINE", "1")
        .output_within(RUN_DEADLINE);
    assert!(
        run.status.success(),
        "TransformerLens failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let theirs: std::collections::BTreeSet<String> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let ours: Vec<String> = gemma3()
        .0
        .config
        .points()
        .all()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(ours.len(), 599);
    // The logits are `unembed.hook_out` here and the model's output there.
    let missing: Vec<&String> = ours
        .iter()
        .filter(|n| !theirs.contains(*n) && *n != "unembed.hook_out")
        .collect();
    assert!(missing.is_empty(), "not TransformerLens's: {missing:?}");
    // TransformerLens's only block point FlexModel-rs lacks is the attention input it
    // adds for its split q/k/v inputs.
    let extra: Vec<&String> = theirs
        .iter()
        .filter(|n| !ours.contains(n) && !n.ends_with("hook_attn_in"))
        .collect();
    assert!(extra.is_empty(), "TransformerLens's only: {extra:?}");
}
