//! `flexmodel cache` as its users run it: the dataset that Python `datasets` reads, equal
//! to the numpy reference; a run killed and resumed; a directory of other arguments
//! refused; a full disk and a read-only directory; bf16 and last positions; bad input.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use candle_core::{DType, Tensor};
use common::child::{Guarded, OutputWithin};
use common::cli::{flexmodel, succeeded, tiny_dir};
use common::dataset::{Read, assert_same_files, files, read_with_datasets, tokens_file};
use common::parity::tiny_for_tp3_on_disk;
use common::processes::{signal, wait_until};
use common::{max_abs_diff, numpy_reference, rel_error};

/// Tokens per row in the tiny model's datasets.
const SEQ: usize = 12;

/// `flexmodel cache --model MODEL --tokens-file TOKENS --out OUT` with `extra` options.
fn cache(model: &Path, tokens: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "cache",
        "--model",
        model.to_str().unwrap(),
        "--tokens-file",
        tokens.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    flexmodel(&args)
}

/// [`cache`], which must succeed; its standard output.
fn cached(model: &Path, tokens: &Path, out: &Path, extra: &[&str]) -> String {
    let output = cache(model, tokens, out, extra);
    assert!(
        output.status.success(),
        "cache {extra:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// [`cache`], which must fail; its standard error.
fn refused(model: &Path, tokens: &Path, out: &Path, extra: &[&str]) -> String {
    let output = cache(model, tokens, out, extra);
    assert!(!output.status.success(), "cache {extra:?} succeeded");
    String::from_utf8(output.stderr).unwrap()
}

/// The token rows of a dataset read back.
fn token_rows(read: &Read) -> Vec<Vec<u32>> {
    read.columns["token_ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(|id| id as u32).collect())
        .collect()
}

/// The worst relative error of any hook column of `read` against the numpy reference
/// of `model` on the dataset's own token rows.
fn worst_error_against_reference(model: &Path, read: &Read) -> f64 {
    let rows = token_rows(read);
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let reference = numpy_reference(model, &rows);
    let mut worst: f64 = 0.0;
    for (name, values) in &read.columns {
        if name == "token_ids" {
            continue;
        }
        let expected = reference[name]
            .reshape(values.dims())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        worst = worst.max(rel_error(values, &expected));
    }
    worst
}

/// The shard files of a dataset's directory, in order.
fn shard_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = files(dir)
        .into_keys()
        .filter(|n| n.starts_with("data-") && n.ends_with(".arrow"))
        .collect();
    names.sort();
    names
}

/// The files `state.json` lists.
fn listed(dir: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(dir.join("state.json")) else {
        return Vec::new();
    };
    let Ok(state) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    state["_data_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["filename"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn datasets_reads_every_hook_point_equal_to_the_numpy_reference_single_and_tp3() {
    // 10 rows of 12 tokens, and 5 tokens that make no whole row.
    let (tokens, ids) = tokens_file(10 * SEQ + 5, 256, 1);
    let seq = SEQ.to_string();
    for (model, layout) in [
        (tiny_dir(3), vec![]),
        (tiny_for_tp3_on_disk(5).0, vec!["--tp", "3"]),
    ] {
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("activations");
        let mut extra = vec![
            "--hook",
            "*",
            "--seq-len",
            &seq,
            "--batch",
            "4",
            "--shard-mb",
            "1",
        ];
        extra.extend_from_slice(&layout);
        let summary = cached(model.path(), tokens.path(), &dir, &extra);
        assert!(
            summary.contains("cached 10 sequences of 12 tokens"),
            "{summary}"
        );

        let read = read_with_datasets(&dir);
        assert_eq!(read.info["rows"], 10);
        let expected: Vec<Vec<u32>> = ids[..10 * SEQ].chunks(SEQ).map(<[u32]>::to_vec).collect();
        assert_eq!(token_rows(&read), expected, "{layout:?}");
        let features = &read.info["features"];
        assert_eq!(features["token_ids"], "List(Value('int32'), length=12)");
        let d_model = match layout.is_empty() {
            true => 64,
            false => 96,
        };
        assert_eq!(
            features["blocks.2.hook_resid_post"],
            format!("Array2D(shape=(12, {d_model}), dtype='float32')")
        );
        assert!(
            features["blocks.1.attn.hook_pattern"]
                .as_str()
                .unwrap()
                .starts_with("Array3D(shape=("),
            "{features}"
        );
        assert_eq!(
            read.info["storage"]["token_ids"],
            "fixed_size_list<item: int32>[12]"
        );
        assert_eq!(
            read.info["storage"]["blocks.2.hook_resid_post"],
            "list<item: list<item: float>>"
        );
        // Every shard within --shard-mb, and more than one of them.
        let shards = shard_files(&dir);
        assert!(shards.len() >= 3, "{shards:?}");
        assert_eq!(listed(&dir), shards);
        for shard in &shards {
            let bytes = std::fs::metadata(dir.join(shard)).unwrap().len();
            assert!(bytes <= 1_000_000, "{shard}: {bytes} bytes");
        }

        let worst = worst_error_against_reference(model.path(), &read);
        eprintln!("{layout:?}: worst relative error against the numpy reference {worst:.2e}");
        assert!(worst < 5e-6, "{layout:?}: {worst:e}");
    }
}

#[test]
fn a_batch_smaller_than_the_replicas_is_padded_and_its_rows_equal_one_shard() {
    // 9 rows in passes of 4, 4 and 1: the last pass has fewer sequences than replicas.
    let (tokens, _) = tokens_file(9 * SEQ, 256, 2);
    let model = tiny_dir(3);
    let out = tempfile::tempdir().unwrap();
    let hooks = ["--hook", "blocks.*.hook_resid_post", "blocks.2.attn.hook_z"];
    let seq = SEQ.to_string();
    let mut runs = Vec::new();
    for layout in [&[][..], &["--dp", "2", "--procs"]] {
        let dir = out.path().join(format!("dp{}", layout.len()));
        let mut extra = vec!["--seq-len", &seq, "--batch", "4"];
        extra.extend_from_slice(&hooks);
        extra.extend_from_slice(layout);
        cached(model.path(), tokens.path(), &dir, &extra);
        runs.push(read_with_datasets(&dir));
    }
    assert_eq!(runs[0].info["rows"], 9);
    assert_eq!(runs[1].info["rows"], 9);
    let mut worst: f64 = 0.0;
    for (name, single) in &runs[0].columns {
        worst = worst.max(rel_error(
            &runs[1].columns[name].to_dtype(DType::F32).unwrap(),
            &single.to_dtype(DType::F32).unwrap(),
        ));
    }
    // Each replica computes its rows as the single shard does, bit for bit.
    assert_eq!(worst, 0.0, "dp=2 --procs against the single shard");
}

#[test]
fn a_run_killed_at_any_point_and_resumed_writes_the_uninterrupted_dataset_bit_for_bit() {
    // Every hook point at 16 tokens: about 600 KB a row, a row a shard of 1 MB, 120
    // shards; long enough to be killed three times at different shards.
    let (tokens, _) = tokens_file(120 * 16, 256, 3);
    let model = tiny_dir(3);
    let out = tempfile::tempdir().unwrap();
    let extra = [
        "--hook",
        "*",
        "--seq-len",
        "16",
        "--batch",
        "2",
        "--shard-mb",
        "1",
    ];
    let whole = out.path().join("whole");
    cached(model.path(), tokens.path(), &whole, &extra);
    let shards = shard_files(&whole).len();
    assert!(shards >= 40, "{shards} shards");

    let resumed = out.path().join("resumed");
    let mut args = vec![
        "cache",
        "--model",
        model.path().to_str().unwrap(),
        "--tokens-file",
        tokens.path().to_str().unwrap(),
        "--out",
        resumed.to_str().unwrap(),
    ];
    args.extend_from_slice(&extra);
    for (run, kill_after) in [1, shards / 3, 2 * shards / 3].into_iter().enumerate() {
        let mut child = Guarded::spawn(
            Command::new(common::flexmodel_binary())
                .args(&args)
                .env("FLEXMODEL_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "flexmodel cache",
        );
        wait_until("shards to be listed", Duration::from_secs(120), || {
            listed(&resumed).len() >= kill_after
        });
        signal(child.id(), "KILL");
        child.wait_within(Duration::from_secs(10));
        let done = listed(&resumed).len();
        assert!(done < shards, "run {run} finished before it was killed");
        eprintln!("run {run} killed with {done} of {shards} shards listed");
        if run == 0 {
            // What a killed run leaves is a valid dataset of its listed shards.
            let read = read_with_datasets(&resumed);
            assert_eq!(read.info["files"].as_array().unwrap().len(), done);
        }
    }
    let summary = cached(model.path(), tokens.path(), &resumed, &extra);
    assert!(summary.contains("cached 120 sequences"), "{summary}");
    assert_same_files(&whole, &resumed);
}

#[test]
fn a_directory_made_with_other_arguments_is_refused_and_left_as_it_was() {
    let (tokens, _) = tokens_file(6 * SEQ, 256, 4);
    let model = tiny_dir(3);
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("activations");
    let seq = SEQ.to_string();
    let base = ["--hook", "blocks.*.hook_resid_post", "--seq-len", &seq];
    cached(model.path(), tokens.path(), &dir, &base);
    let before = files(&dir);

    let other_model = tiny_dir(4);
    let resid = "blocks.*.hook_resid_post";
    for (model, extra, says) in [
        (
            model.path(),
            vec!["--hook", resid, "--seq-len", "8"],
            "seq_len 12 there, 8 here",
        ),
        (
            model.path(),
            vec!["--hook", resid, "--seq-len", &seq, "--dtype", "bf16"],
            "dtype \"f32\" there, \"bf16\" here",
        ),
        (
            model.path(),
            vec!["--hook", "blocks.0.hook_resid_pre", "--seq-len", &seq],
            "hooks [",
        ),
        (
            model.path(),
            vec!["--hook", resid, "--seq-len", &seq, "--positions", "last"],
            "positions \"all\" there, \"last\" here",
        ),
        (
            model.path(),
            vec![
                "--hook",
                resid,
                "--seq-len",
                &seq,
                "--edit",
                "blocks.0.hook_resid_post=scale:2",
            ],
            "edits [] there, [\"blocks.0.hook_resid_post=scale:2\"] here",
        ),
        (other_model.path(), base.to_vec(), "model \""),
    ] {
        let e = refused(model, tokens.path(), &dir, &extra);
        assert!(
            e.contains("holds a dataset made with other arguments"),
            "{e}"
        );
        assert!(e.contains(says), "{extra:?}: {e}");
    }
    assert!(before == files(&dir), "a refused run changed the directory");

    // A directory with other files in it is not taken for a dataset either.
    let other = out.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let e = refused(model.path(), tokens.path(), &other, &base);
    assert!(e.contains("not a dataset of `flexmodel cache`"), "{e}");
    assert_eq!(files(&other).len(), 1);
}

#[test]
fn a_complete_dataset_run_again_exits_0_and_changes_nothing() {
    let (tokens, _) = tokens_file(6 * SEQ, 256, 5);
    let model = tiny_dir(3);
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("activations");
    let seq = SEQ.to_string();
    let extra = ["--hook", "blocks.*.hook_resid_post", "--seq-len", &seq];
    cached(model.path(), tokens.path(), &dir, &extra);
    let modified = |dir: &Path| -> Vec<(String, std::time::SystemTime)> {
        let mut all: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().modified().unwrap(),
                )
            })
            .collect();
        all.sort();
        all
    };
    let (bytes, times) = (files(&dir), modified(&dir));
    let again = cached(model.path(), tokens.path(), &dir, &extra);
    assert!(again.contains("is complete already"), "{again}");
    assert!(bytes == files(&dir));
    assert_eq!(times, modified(&dir));
}

/// Runs `script` with `sh` in a mount namespace of its own (root), where it can mount
/// file systems that vanish with it.
fn in_mount_namespace(script: &str) {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .output_within(Duration::from_secs(60));
    assert!(
        out.status.success(),
        "the namespace's script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_full_disk_or_a_read_only_directory_fails_clearly_and_keeps_the_complete_shards() {
    // 1 KB a token position (4 layers of d = 64): 60 rows of 16 tokens a shard of 1 MB,
    // four shards; a file system of 2.5 MiB fills up in the third.
    let (tokens, _) = tokens_file(200 * 16, 256, 6);
    let model = tiny_dir(3);
    let out = tempfile::tempdir().unwrap();
    let whole = out.path().join("whole");
    let extra = [
        "--hook",
        "blocks.*.hook_resid_post",
        "--seq-len",
        "16",
        "--batch",
        "4",
        "--shard-mb",
        "1",
    ];
    cached(model.path(), tokens.path(), &whole, &extra);
    let shards = shard_files(&whole);
    assert!(shards.len() >= 3, "{shards:?}");

    let (small, read_only) = (out.path().join("small"), out.path().join("read-only"));
    std::fs::create_dir(&small).unwrap();
    std::fs::create_dir(&read_only).unwrap();
    let command = |dir: &Path| {
        let mut words = vec![
            common::flexmodel_binary().display().to_string(),
            "cache".into(),
            "--model".into(),
            model.path().display().to_string(),
            "--tokens-file".into(),
            tokens.path().display().to_string(),
            "--out".into(),
            dir.display().to_string(),
        ];
        words.extend(extra.iter().map(|s| format!("'{s}'")));
        words.join(" ")
    };
    let o = out.path().display();
    let script = format!(
        "set -u
         mount -t tmpfs -o size=2560k tmpfs {small}
         {full} 2> {o}/full.err; echo $? > {o}/full.rc
         cp -r {small}/ds {o}/full
         mount -o remount,ro {small}
         {again} 2> {o}/again.err; echo $? > {o}/again.rc
         cp -r {small}/ds {o}/again
         mount -t tmpfs -o ro tmpfs {read_only}
         {fresh} 2> {o}/fresh.err; echo $? > {o}/fresh.rc",
        small = small.display(),
        read_only = read_only.display(),
        full = command(&small.join("ds")),
        again = command(&small.join("ds")),
        fresh = command(&read_only.join("ds")),
    );
    in_mount_namespace(&script);
    let outcome = |name: &str| -> (String, String) {
        let rc = std::fs::read_to_string(out.path().join(format!("{name}.rc"))).unwrap();
        let err = std::fs::read_to_string(out.path().join(format!("{name}.err"))).unwrap();
        (rc.trim().to_string(), err)
    };

    // The full disk: a clear error, and the shards before it complete and listed.
    let (rc, err) = outcome("full");
    assert_ne!(rc, "0", "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let full = out.path().join("full");
    let complete = listed(&full);
    eprintln!(
        "the full disk stopped the run with {} of {} shards listed",
        complete.len(),
        shards.len()
    );
    assert!(
        !complete.is_empty() && complete.len() < shards.len(),
        "{complete:?}"
    );
    assert!(
        err.contains(&format!(
            "its {} complete shards of {} are intact",
            complete.len(),
            shards.len()
        )),
        "{err}"
    );
    for name in &complete {
        assert!(files(&full)[name] == files(&whole)[name], "{name}");
    }
    assert!(
        files(&full).keys().all(|n| !n.ends_with(".tmp")),
        "a temporary file was left: {:?}",
        files(&full).keys()
    );
    let read = read_with_datasets(&full);
    assert_eq!(read.info["files"].as_array().unwrap().len(), complete.len());

    // The same directory made read-only: refused, and unchanged.
    let (rc, err) = outcome("again");
    assert_ne!(rc, "0", "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(files(&out.path().join("again")) == files(&full));

    // A read-only directory for a new dataset: a clear error naming it.
    let (rc, err) = outcome("fresh");
    assert_ne!(rc, "0", "{err}");
    assert!(
        err.contains("Read-only file system") && err.contains(&*read_only.to_string_lossy()),
        "{err}"
    );

    // With room again, the same command finishes the dataset as one run writes it.
    cached(model.path(), tokens.path(), &full, &extra);
    assert_same_files(&whole, &full);
}

#[test]
fn bf16_rows_are_the_f32_rows_rounded_and_last_positions_are_the_last_rows() {
    let (tokens, _) = tokens_file(5 * SEQ, 256, 7);
    let model = tiny_dir(3);
    let out = tempfile::tempdir().unwrap();
    let seq = SEQ.to_string();
    let hooks = [
        "--hook",
        "blocks.*.hook_resid_post",
        "blocks.1.attn.hook_pattern",
        "blocks.0.attn.hook_z",
        "--seq-len",
        &seq,
    ];
    let mut reads = Vec::new();
    for extra in [&[][..], &["--dtype", "bf16"], &["--positions", "last"]] {
        let dir = out.path().join(format!("run{}", reads.len()));
        let mut args = hooks.to_vec();
        args.extend_from_slice(extra);
        cached(model.path(), tokens.path(), &dir, &args);
        reads.push(read_with_datasets(&dir));
    }
    let [f32s, bf16s, last] = &reads[..] else {
        unreachable!()
    };
    let pattern = "blocks.1.attn.hook_pattern";
    assert_eq!(
        bf16s.info["storage"]["blocks.0.attn.hook_z"],
        "list<item: list<item: halffloat>>"
    );
    assert_eq!(
        bf16s.info["features"]["blocks.0.attn.hook_z"],
        "Array2D(shape=(12, 64), dtype='float16')"
    );
    assert_eq!(
        last.info["features"][pattern],
        "Array3D(shape=(8, 1, 12), dtype='float32')"
    );
    for (name, values) in &f32s.columns {
        if name == "token_ids" {
            assert!(
                bf16s.columns[name].to_vec2::<i64>().unwrap() == values.to_vec2::<i64>().unwrap()
            );
            continue;
        }
        let rounded: Vec<f32> = values
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect();
        let stored = bf16s.columns[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (s, r) in stored.iter().zip(&rounded) {
            // float16 holds bfloat16 exactly from 2^-14 up, to within 2^-25 below.
            match r.abs() >= 2f32.powi(-14) {
                true => assert!(s == r, "{name}: {s} stored for the bf16 {r}"),
                false => assert!((s - r).abs() <= 2f32.powi(-25), "{name}: {s} for {r}"),
            }
        }
        let position = if name == pattern { 2 } else { 1 };
        let expected = values.narrow(position, SEQ - 1, 1).unwrap();
        assert_eq!(last.columns[name].dims(), expected.dims(), "{name}");
        let differs = max_abs_diff(&last.columns[name], &expected);
        assert!(
            differs == 0.0,
            "{name}: the last position differs by {differs}"
        );
    }
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let (tokens, _) = tokens_file(3 * SEQ, 256, 8);
    let model = tiny_dir(3);
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("activations");
    let seq = SEQ.to_string();
    for (extra, says) in [
        (
            vec!["--hook", "blocks.0.hook_resid_pots"],
            "blocks.0.hook_resid_post",
        ),
        (
            vec!["--hook", "*", "--max-tokens", "5", "--seq-len", &seq],
            "the corpus has 5 tokens to use, fewer than one sequence of 12",
        ),
        (
            vec!["--hook", "*", "--seq-len", "36", "--shard-mb", "1"],
            "more than a shard of at most 1000000 bytes can hold",
        ),
        (
            vec!["--hook", "*", "--seq-len", "600"],
            "longer than the model's context",
        ),
        (vec!["--hook", "*", "--seq-len", "0"], "--seq-len"),
        (vec!["--hook", "*", "--dtype", "f64"], "--dtype"),
        (
            vec!["--hook", "*", "--edit", "blocks.0.hook_resid_post=shift:1"],
            "unknown action",
        ),
    ] {
        let e = refused(model.path(), tokens.path(), &dir, &extra);
        assert!(e.contains(says), "{extra:?}: {e}");
        assert!(!dir.exists(), "{extra:?} made the directory");
    }
    // --out naming a file.
    let file = out.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let e = refused(
        model.path(),
        tokens.path(),
        &file,
        &["--hook", "*", "--seq-len", &seq],
    );
    assert!(e.contains("not a directory"), "{e}");
    // A token id outside the vocabulary, with its line.
    let bad = out.path().join("bad.txt");
    std::fs::write(&bad, "1 2 3\n4 999 5\n").unwrap();
    let e = refused(model.path(), &bad, &dir, &["--hook", "*"]);
    assert!(e.contains("bad.txt:2") && e.contains("token id 999"), "{e}");
    // Text and tokens both.
    let e = String::from_utf8(
        flexmodel(&[
            "cache",
            "--model",
            model.path().to_str().unwrap(),
            "--text",
            bad.to_str().unwrap(),
            "--tokens-file",
            bad.to_str().unwrap(),
            "--hook",
            "*",
            "--out",
            dir.to_str().unwrap(),
        ])
        .stderr,
    )
    .unwrap();
    assert!(e.contains("cannot be used with"), "{e}");
}

#[test]
fn smollm2_text_cached_under_tp3_pp2_procs_equals_the_single_shard() {
    let text = common::shakespeare_path();
    let out = tempfile::tempdir().unwrap();
    let mut reads = Vec::new();
    for layout in [&[][..], &["--tp", "3", "--pp", "2", "--procs"]] {
        let dir = out.path().join(format!("run{}", reads.len()));
        let mut args = vec![
            "cache",
            "--model",
            "smollm2",
            "--text",
            text.to_str().unwrap(),
            "--hook",
            "blocks.*.hook_resid_post",
            "blocks.20.attn.hook_z",
            "--out",
            dir.to_str().unwrap(),
            "--seq-len",
            "32",
            "--batch",
            "4",
            "--max-tokens",
            "256",
            "--shard-mb",
            "5",
        ];
        args.extend_from_slice(layout);
        let summary = succeeded(&args);
        assert!(
            summary.contains("cached 8 sequences of 32 tokens (31 hook points)"),
            "{summary}"
        );
        reads.push(read_with_datasets(&dir));
    }
    assert_eq!(reads[0].info["rows"], 8);
    let mut worst: f64 = 0.0;
    for (name, single) in &reads[0].columns {
        if name == "token_ids" {
            continue;
        }
        worst = worst.max(rel_error(&reads[1].columns[name], single));
    }
    eprintln!("tp=3 pp=2 --procs against the single shard: {worst:.2e}");
    assert!(worst < 2e-5, "{worst:e}");
    let single: Tensor = reads[0].columns["token_ids"].clone();
    assert!(
        single.to_vec2::<i64>().unwrap() == reads[1].columns["token_ids"].to_vec2::<i64>().unwrap()
    );
}
