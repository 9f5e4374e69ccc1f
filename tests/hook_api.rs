//! The hook API on one shard: capture, edits, handles, aliases, the store and the save
//! context, on the tiny model.

mod common;

use candle_core::Tensor;
use common::{batch, capture_all, max_abs_diff};
use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{Error, FlexModel, HookFunction, edits};

fn tiny() -> FlexModel {
    FlexModel::new(tiny_checkpoint(4).unwrap().load_model().unwrap())
}

fn tokens() -> Tensor {
    batch(&[&[5, 17, 200, 3, 99], &[1, 2, 3, 4, 5]])
}

#[test]
fn capturing_every_point_stores_what_the_pass_computed() {
    let mut model = tiny();
    let (raw_logits, raw) = capture_all(
        &tiny_checkpoint(4).unwrap().load_model().unwrap(),
        &tokens(),
    );
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    let logits = model.forward(tokens()).unwrap();
    assert_eq!(
        max_abs_diff(&logits, &raw_logits),
        0.0,
        "capturing changes nothing"
    );
    assert_eq!(model.store().len(), common::default_points(4));
    assert_eq!(raw.len(), model.store().len());
    for (name, values) in model.store().iter() {
        assert_eq!(values.len(), 1, "{name}: one call per pass");
        assert_eq!(max_abs_diff(&values[0], &raw[name]), 0.0, "{name}");
    }
    let expected_bytes: usize = raw.values().map(|t| t.elem_count() * 4).sum();
    assert_eq!(model.store().bytes(), expected_bytes);
}

#[test]
fn the_store_keeps_the_pre_edit_value_and_the_model_continues_with_the_edit() {
    let mut model = tiny();
    let hooks = model.hooks_mut();
    hooks
        .register(HookFunction::new("blocks.1.hook_resid_post").with_edit(edits::scale(2.0)))
        .unwrap();
    hooks
        .register(HookFunction::new("blocks.2.hook_resid_pre"))
        .unwrap();
    model.forward(tokens()).unwrap();
    let before = model.store().last("blocks.1.hook_resid_post").unwrap();
    let after = model.store().last("blocks.2.hook_resid_pre").unwrap();
    assert!(max_abs_diff(&(before * 2.0).unwrap(), after) < 1e-6);
}

#[test]
fn an_edit_runs_once_per_call_and_sees_name_call_and_full_shape() {
    let mut model = tiny();
    let hook = HookFunction::new("blocks.*.attn.hook_pattern").with_edit(|ctx, x| {
        let record = (ctx.name().to_string(), ctx.call(), x.dims().to_vec());
        let seen = ctx
            .save()
            .get_or_insert_with("seen", Vec::<(String, usize, Vec<usize>)>::new)?;
        seen.push(record);
        Ok(x)
    });
    model.hooks_mut().register(hook.without_capture()).unwrap();
    model.forward(tokens()).unwrap();
    model.forward(tokens()).unwrap();
    let seen = model
        .save_ctx()
        .get::<Vec<(String, usize, Vec<usize>)>>("seen")
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(seen.len(), 8, "4 layers × 2 passes, once each");
    for (i, (name, call, shape)) in seen.iter().enumerate() {
        assert_eq!(name, &format!("blocks.{}.attn.hook_pattern", i % 4));
        assert_eq!(*call, 0);
        assert_eq!(shape, &[2, 8, 5, 5]);
    }
    assert!(model.store().is_empty(), "without_capture stores nothing");
}

#[test]
fn edits_at_one_point_chain_in_registration_order() {
    let mut model = tiny();
    let hooks = model.hooks_mut();
    hooks
        .register(HookFunction::new("blocks.0.hook_mlp_out").with_edit(edits::scale(3.0)))
        .unwrap();
    let add_one = HookFunction::new("blocks.0.hook_mlp_out").with_edit(|_, x| Ok((x + 1.0)?));
    hooks.register(add_one).unwrap();
    hooks
        .register(HookFunction::new("blocks.0.hook_resid_mid"))
        .unwrap();
    hooks
        .register(HookFunction::new("blocks.0.hook_resid_post"))
        .unwrap();
    model.forward(tokens()).unwrap();
    let store = model.store();
    let mlp = store.last("blocks.0.hook_mlp_out").unwrap();
    let mid = store.last("blocks.0.hook_resid_mid").unwrap();
    let expected = ((mid + ((mlp * 3.0).unwrap() + 1.0).unwrap()).unwrap()).clone();
    assert!(max_abs_diff(&expected, store.last("blocks.0.hook_resid_post").unwrap()) < 1e-5);
}

#[test]
fn module_names_hook_the_points_they_coincide_with() {
    let mut model = tiny();
    let hooks = model.hooks_mut();
    hooks
        .register(HookFunction::new("model.layers.2.mlp"))
        .unwrap();
    hooks
        .register(HookFunction::forward_pre("model.layers.3"))
        .unwrap();
    hooks.register(HookFunction::new("lm_head")).unwrap();
    let logits = model.forward(tokens()).unwrap();
    let names: Vec<&str> = model.store().iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "blocks.2.hook_mlp_out",
            "blocks.3.hook_resid_pre",
            "unembed.hook_out"
        ]
    );
    assert_eq!(
        max_abs_diff(model.store().last("unembed.hook_out").unwrap(), &logits),
        0.0
    );
}

#[test]
fn unknown_names_are_errors_that_suggest_the_nearest() {
    let mut model = tiny();
    let err = model
        .hooks_mut()
        .register(HookFunction::new("blocks.2.attn.hook_patern"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown forward hook target \"blocks.2.attn.hook_patern\"; nearest: blocks.2.attn.hook_pattern, \
         blocks.0.attn.hook_pattern, blocks.1.attn.hook_pattern"
    );
    let err = model
        .hooks_mut()
        .register(HookFunction::new("blocks.9.hook_resid_pre"))
        .unwrap_err();
    assert!(
        err.to_string().contains("nearest: blocks.0.hook_resid_pre"),
        "{err}"
    );
    assert!(model.hooks().is_empty());
}

#[test]
fn handles_remove_hooks_one_by_one_or_all_at_once() {
    let mut model = tiny();
    let a = model
        .hooks_mut()
        .register(HookFunction::new("hook_embed"))
        .unwrap();
    let b = model
        .hooks_mut()
        .register(HookFunction::new("blocks.0.attn.hook_z"))
        .unwrap();
    model.hooks_mut().remove(a).unwrap();
    assert!(matches!(model.hooks_mut().remove(a), Err(Error::UnknownHandle(h)) if h == a));
    model.forward(tokens()).unwrap();
    let names: Vec<&str> = model.store().iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["blocks.0.attn.hook_z"]);
    model.hooks_mut().clear();
    assert!(model.hooks().points(b).is_err());
    model.store_mut().clear();
    model.forward(tokens()).unwrap();
    assert!(model.store().is_empty());
}

#[test]
fn an_edit_that_changes_the_shape_fails_the_pass_and_leaves_everything_usable() {
    let mut model = tiny();
    model.hooks_mut().register(HookFunction::new("*")).unwrap();
    model.forward(tokens()).unwrap();
    let bytes_before = model.store().bytes();
    let bad = HookFunction::new("blocks.1.attn.hook_q").with_edit(|_, x| Ok(x.narrow(2, 0, 2)?));
    let bad = model.hooks_mut().register(bad).unwrap();
    let err = model.forward(tokens()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "hook blocks.1.attn.hook_q: the edit returned [2, 5, 2, 8] F32, expected [2, 5, 8, 8] F32 \
         (edits must keep shape and dtype)"
    );
    assert_eq!(
        model.store().bytes(),
        bytes_before,
        "the failed pass stored nothing"
    );
    model.hooks_mut().remove(bad).unwrap();
    model.forward(tokens()).unwrap();
    assert_eq!(model.store().bytes(), 2 * bytes_before);
}

#[test]
fn an_edit_that_changes_the_dtype_fails_the_pass() {
    let mut model = tiny();
    let bad =
        HookFunction::new("hook_embed").with_edit(|_, x| Ok(x.to_dtype(candle_core::DType::F64)?));
    model.hooks_mut().register(bad).unwrap();
    let err = model.forward(tokens()).unwrap_err();
    assert!(
        matches!(&err, Error::EditChangedTensor { hook, .. } if hook == "hook_embed"),
        "{err}"
    );
}

#[test]
fn an_edit_that_errs_or_panics_fails_the_pass_naming_the_hook() {
    let mut model = tiny();
    let failing = HookFunction::new("blocks.2.hook_mlp_out")
        .with_edit(|_, _| Err(Error::custom("probe not trained")));
    let handle = model.hooks_mut().register(failing).unwrap();
    let err = model.forward(tokens()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "hook blocks.2.hook_mlp_out: probe not trained"
    );
    model.hooks_mut().remove(handle).unwrap();

    let panicking = HookFunction::new("blocks.3.hook_mlp_out").with_edit(|_, _| panic!("boom"));
    let handle = model.hooks_mut().register(panicking).unwrap();
    let err = model.forward(tokens()).unwrap_err();
    assert!(
        err.to_string().starts_with("hook blocks.3.hook_mlp_out: ")
            && err.to_string().contains("boom"),
        "{err}"
    );
    model.hooks_mut().remove(handle).unwrap();
    model.forward(tokens()).unwrap();
}

#[test]
fn captures_accumulate_across_passes_until_taken() {
    let mut model = tiny();
    model
        .hooks_mut()
        .register(HookFunction::new("blocks.0.hook_resid_pre"))
        .unwrap();
    model.forward(tokens()).unwrap();
    model.forward(batch(&[&[9, 9]])).unwrap();
    let taken = model.store_mut().take("blocks.0.hook_resid_pre").unwrap();
    assert_eq!(taken.len(), 2);
    assert_eq!(taken[0].dims(), [2, 5, 64]);
    assert_eq!(taken[1].dims(), [1, 2, 64]);
    assert!(model.store().is_empty());
}
