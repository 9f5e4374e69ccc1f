//! Hook groups with FlexModel's semantics, without its bugs: groups built from a glob
//! are never empty, unknown groups are errors, `all` is implicit, disabled hooks can be
//! enabled again.

mod common;

use candle_core::Tensor;
use common::batch;
use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{Error, FlexModel, Groups, HookFunction};

fn tiny() -> FlexModel {
    FlexModel::new(tiny_checkpoint(4).unwrap().load_model().unwrap())
}

fn tokens() -> Tensor {
    batch(&[&[5, 17, 200, 3]])
}

/// The names captured by one pass over `groups` (the store is emptied first).
fn captured(model: &mut FlexModel, groups: &Groups) -> Vec<String> {
    model.store_mut().clear();
    model.forward_groups(tokens(), groups).unwrap();
    model.store().iter().map(|(n, _)| n.to_string()).collect()
}

/// A model with group "resid" (every resid_post) and group "attn" (every pattern).
fn grouped() -> FlexModel {
    let mut model = tiny();
    let hooks = model.hooks_mut();
    hooks
        .create_hook_group("resid", HookFunction::new("blocks.*.hook_resid_post"))
        .unwrap();
    hooks
        .create_hook_group("attn", HookFunction::new("blocks.*.attn.hook_pattern"))
        .unwrap();
    hooks.register(HookFunction::new("hook_embed")).unwrap();
    model
}

fn names(pattern: &str) -> Vec<String> {
    (0..4)
        .map(|i| pattern.replace('*', &i.to_string()))
        .collect()
}

#[test]
fn a_group_from_a_glob_has_one_tagged_hook_per_matching_point() {
    let mut model = tiny();
    let handles = model
        .hooks_mut()
        .create_hook_group("resid", HookFunction::new("blocks.*.hook_resid_post"))
        .unwrap();
    assert_eq!(handles.len(), 4);
    for (i, h) in handles.iter().enumerate() {
        let points: Vec<String> = model
            .hooks()
            .points(*h)
            .unwrap()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(points, [format!("blocks.{i}.hook_resid_post")]);
        assert_eq!(
            model.hooks().tags(*h).unwrap().collect::<Vec<_>>(),
            ["all", "resid"]
        );
    }
}

#[test]
fn a_group_pattern_that_matches_nothing_is_an_error_not_an_empty_group() {
    let mut model = tiny();
    let err = model
        .hooks_mut()
        .create_hook_group("x", HookFunction::new("layers.*.mlp"))
        .unwrap_err();
    assert!(matches!(err, Error::UnknownHookPoint { .. }), "{err}");
    assert_eq!(model.hooks().groups().collect::<Vec<_>>(), ["all"]);
}

#[test]
fn a_pass_runs_only_the_chosen_groups_or_their_complement() {
    let mut model = grouped();
    let mut resid = names("blocks.*.hook_resid_post");
    assert_eq!(captured(&mut model, &Groups::only(["resid"])), resid);
    let mut complement = names("blocks.*.attn.hook_pattern");
    complement.push("hook_embed".into());
    complement.sort();
    assert_eq!(captured(&mut model, &Groups::except(["resid"])), complement);
    // The complement pass leaves every hook usable: all of them run again.
    let mut everything = complement.clone();
    everything.append(&mut resid);
    everything.sort();
    assert_eq!(captured(&mut model, &Groups::All), everything);
    assert_eq!(captured(&mut model, &Groups::only(["all"])), everything);
}

#[test]
fn unknown_group_names_are_errors() {
    let mut model = grouped();
    let err = model
        .forward_groups(tokens(), &Groups::only(["resdi"]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown hook group \"resdi\" (known groups: all, attn, resid)"
    );
    assert!(model.hooks_mut().remove_tag("hook_embed", "nope").is_err());
    assert!(model.hooks_mut().set_group_enabled("nope", false).is_err());
}

#[test]
fn all_is_implicit_and_cannot_be_removed() {
    let mut model = grouped();
    assert!(matches!(
        model.hooks_mut().remove_tag("*", "all"),
        Err(Error::ImplicitGroup)
    ));
    let err = model
        .hooks_mut()
        .create_hook_group("all", HookFunction::new("hook_embed"))
        .unwrap_err();
    assert!(matches!(err, Error::ImplicitGroup));
}

#[test]
fn tags_are_added_and_removed_by_pattern_and_by_handle() {
    let mut model = grouped();
    let hooks = model.hooks_mut();
    assert_eq!(
        hooks.add_tag("blocks.0.*", "early").unwrap(),
        2,
        "resid_post and pattern"
    );
    assert_eq!(hooks.add_tag("blocks.1.*", "early").unwrap(), 2);
    let mlp = hooks
        .register(HookFunction::new("blocks.0.hook_mlp_out"))
        .unwrap();
    hooks.add_tag(mlp, "early").unwrap();
    assert_eq!(captured(&mut model, &Groups::only(["early"])).len(), 5);
    assert_eq!(
        model.hooks_mut().remove_tag("blocks.0.*", "early").unwrap(),
        3
    );
    assert_eq!(
        captured(&mut model, &Groups::only(["early"])),
        ["blocks.1.attn.hook_pattern", "blocks.1.hook_resid_post"]
    );
    let err = model
        .hooks_mut()
        .add_tag("blocks.*.attn.hook_q", "x")
        .unwrap_err();
    assert!(matches!(err, Error::NoHookMatches(_)), "{err}");
}

#[test]
fn disabled_hooks_do_not_run_and_can_be_enabled_again() {
    let mut model = grouped();
    model.hooks_mut().set_group_enabled("attn", false).unwrap();
    let without_attn = captured(&mut model, &Groups::All);
    assert!(
        without_attn.iter().all(|n| !n.contains("pattern")),
        "{without_attn:?}"
    );
    model.hooks_mut().set_group_enabled("attn", true).unwrap();
    assert_eq!(
        captured(&mut model, &Groups::only(["attn"])),
        names("blocks.*.attn.hook_pattern")
    );
    model.hooks_mut().set_enabled("hook_embed", false).unwrap();
    assert!(!captured(&mut model, &Groups::All).contains(&"hook_embed".to_string()));
    model.hooks_mut().set_enabled("hook_embed", true).unwrap();
    assert!(captured(&mut model, &Groups::All).contains(&"hook_embed".to_string()));
}

#[test]
fn a_group_shares_one_edit_across_its_points() {
    let mut model = tiny();
    let count = HookFunction::new("blocks.*.hook_mlp_out")
        .without_capture()
        .with_edit(|ctx, x| {
            *ctx.save().get_or_insert_with("calls", || 0usize)? += 1;
            Ok(x)
        });
    model.hooks_mut().create_hook_group("mlp", count).unwrap();
    model
        .forward_groups(tokens(), &Groups::only(["mlp"]))
        .unwrap();
    assert_eq!(model.save_ctx().get::<usize>("calls").unwrap(), Some(&4));
}
