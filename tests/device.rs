//! `--device` and `Layout::with_device`: the device is a parameter of every command and
//! of the API; the CPU is the default, and a build without the `cuda` feature says so
//! clearly when asked for a GPU.

mod common;

use std::collections::BTreeMap;
use std::process::Output;

use common::cli::{flexmodel, succeeded};
use common::smollm2_path;
use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{FlexModel, HookFunction};
use flexmodel_cluster::{DeviceSpec, Layout};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `capture` of two hook points of SmolLM2 on the France prompt, with `extra`.
fn capture(dir: &std::path::Path, name: &str, extra: &[&str]) -> Output {
    let model = smollm2_path();
    let out = dir.join(name);
    let mut args = vec![
        "capture",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--hook",
        "blocks.3.hook_resid_post",
        "--hook",
        "blocks.7.attn.hook_z",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    flexmodel(&args)
}

#[test]
fn asking_for_the_cpu_is_the_default_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("default.safetensors", &[][..]),
        ("cpu.safetensors", &["--device", "cpu"][..]),
        ("cpu-tp3.safetensors", &["--device", "cpu", "--tp", "3"][..]),
    ] {
        let out = capture(dir.path(), name, extra);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
    }
    let read = |name: &str| -> BTreeMap<String, Vec<f32>> {
        common::cli::tensors(&dir.path().join(name))
            .into_iter()
            .collect()
    };
    let default = read("default.safetensors");
    assert!(
        default.contains_key("blocks.7.attn.hook_z"),
        "{:?}",
        default.keys()
    );
    assert_eq!(read("cpu.safetensors"), default);
    // Tensor parallelism changes the order of sums: equal within the parity tolerance.
    for (name, values) in read("cpu-tp3.safetensors") {
        let reference = &default[&name];
        let worst = values
            .iter()
            .zip(reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = reference.iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4 * scale.max(1.0), "{name}: {worst}");
    }
}

#[test]
fn a_device_that_names_nothing_is_refused_with_the_known_names() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1"] {
        let out = capture(dir.path(), "x.safetensors", &["--device", bad]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "unknown device \"{bad}\" (known: cpu, cuda, cuda:N)"
            )),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_job_s_workers_keep_their_own_device() {
    let out = flexmodel(&[
        "hooks",
        "--model",
        "smollm2",
        "--cluster",
        "etcd://127.0.0.1:9/job",
        "--device",
        "cuda:0",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("'--cluster <URL>' cannot be used with '--device <cpu|cuda[:N]>'"),
        "{err}"
    );
}

#[cfg(not(feature = "cuda"))]
mod without_cuda {
    use super::*;

    const NOT_BUILT: &str = "this build of flexmodel is built without the `cuda` feature";

    #[test]
    fn commands_asked_for_a_gpu_say_this_build_has_none() {
        let dir = tempfile::tempdir().unwrap();
        for device in ["cuda", "cuda:0", "cuda:1"] {
            for extra in [
                &["--device", device][..],
                &["--device", device, "--tp", "3"],
            ] {
                let out = capture(dir.path(), "x.safetensors", extra);
                assert!(!out.status.success(), "{extra:?}");
                let err = stderr(&out);
                assert!(err.contains(NOT_BUILT), "{extra:?}: {err}");
                assert!(err.contains("scripts/build-cuda"), "{err}");
            }
        }
        assert!(!dir.path().join("x.safetensors").exists());
    }

    #[test]
    fn a_worker_asked_for_a_gpu_fails_at_start_saying_why() {
        // Nothing listens on port 9: the device is checked before etcd is dialled.
        let token = common::etcd::TokenFile::new("device-secret");
        let out = flexmodel(&[
            "worker",
            "--etcd",
            "127.0.0.1:9",
            "--job",
            "j",
            "--token-file",
            token.path.to_str().unwrap(),
            "--device",
            "cuda:0",
        ]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(NOT_BUILT), "{}", stderr(&out));
    }

    #[test]
    fn the_api_asked_for_a_gpu_fails_before_reading_weights() {
        let checkpoint = tiny_checkpoint(3).unwrap();
        for layout in [
            Layout::SINGLE.with_device(DeviceSpec::Cuda(Some(0))),
            Layout::new(2, 1, 2)
                .unwrap()
                .with_device(DeviceSpec::Cuda(None)),
        ] {
            let err = FlexModel::build(&checkpoint, layout)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(NOT_BUILT), "{layout}: {err}");
        }
    }
}

#[test]
fn hooks_on_the_cpu_device_see_host_tensors_and_the_store_keeps_them() {
    let checkpoint = tiny_checkpoint(4).unwrap();
    let layout = Layout::new(1, 2, 2).unwrap().with_device(DeviceSpec::Cpu);
    let mut model = FlexModel::build(&checkpoint, layout).unwrap();
    model
        .hooks_mut()
        .register(
            HookFunction::new("blocks.1.hook_resid_post").with_edit(|_, x| {
                assert!(x.device().is_cpu());
                Ok(x)
            }),
        )
        .unwrap();
    let tokens = common::batch(&[&[1, 2, 3, 4]]);
    let logits = model.forward(&tokens).unwrap();
    assert!(logits.device().is_cpu());
    let captured = model.store().last("blocks.1.hook_resid_post").unwrap();
    assert!(captured.device().is_cpu());
    let _ = succeeded(&["hooks", "--model", "smollm2", "--device", "cpu"]);
}
