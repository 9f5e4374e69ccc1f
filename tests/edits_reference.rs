//! Edited runs against the numpy reference's edited runs.

mod common;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use common::{batch, numpy_reference_with_edits, rel_error, smollm2, smollm2_path};
use flexmodel::edits::EditSpec;
use flexmodel::{FlexModel, HookFunction};

#[test]
fn smollm2_edited_run_matches_the_numpy_edited_run_at_every_point() {
    let dir = tempfile::tempdir().unwrap();
    let delta_file = dir.path().join("delta.safetensors");
    let delta = Tensor::randn(0f32, 1.0, 576, &Device::Cpu).unwrap();
    let key = "blocks.5.hook_resid_mid";
    candle_core::safetensors::save(
        &BTreeMap::from([(key.to_string(), delta)])
            .into_iter()
            .collect(),
        &delta_file,
    )
    .unwrap();
    let specs = [
        "blocks.3.attn.hook_z=zero-head:4".to_string(),
        "blocks.7.attn.hook_pattern=zero-head:8".to_string(),
        "blocks.10.hook_mlp_out=scale:0.5".to_string(),
        "blocks.12.attn.hook_v=zero-head:2".to_string(),
        format!("{key}=add:{}", delta_file.display()),
        "blocks.14.attn.hook_result=zero-head:5".to_string(),
        "blocks.16.hook_k_input=zero-head:1".to_string(),
        "blocks.18.ln2.hook_scale=scale:2".to_string(),
        "blocks.20.hook_mlp_in=scale:0.5".to_string(),
    ];
    let rows: &[&[u32]] = &[
        &[504, 3575, 282, 4649, 314, 7042],
        &[1, 9690, 198, 2683, 359, 30],
    ];
    let reference = numpy_reference_with_edits(&smollm2_path(), rows, &specs);

    let (checkpoint, _) = smollm2();
    let mut model = FlexModel::new(checkpoint.load_model().unwrap());
    for spec in &specs {
        model
            .hooks_mut()
            .register(EditSpec::parse(spec).unwrap().hook_function())
            .unwrap();
    }
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    model.forward(batch(rows)).unwrap();

    let mut worst = 0.0f64;
    for (name, captured) in model.store().iter() {
        let err = rel_error(&captured[0], &reference[name]);
        // Measured worst: 8.3e-6.
        assert!(err <= 3e-5, "{name}: relative error {err:.3e}");
        worst = worst.max(err);
    }
    eprintln!(
        "edited run: worst relative error {worst:.3e} over {} hook points",
        model.store().len()
    );
    // The edits changed the result: the unedited reference differs at the logits.
    let unedited = numpy_reference_with_edits(&smollm2_path(), rows, &[]);
    assert!(
        rel_error(
            &reference["unembed.hook_out"],
            &unedited["unembed.hook_out"]
        ) > 1e-2
    );
}
