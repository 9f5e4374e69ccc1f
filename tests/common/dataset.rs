//! Activation datasets as their readers see them: Python `datasets` reading a
//! directory (`tests/reference/read_dataset.py`), and a directory's files byte for byte.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::common::child::{OutputWithin, RUN_DEADLINE};
use candle_core::{Device, Tensor};

/// What `datasets.load_from_disk` read: the script's JSON line (rows, features, Arrow
/// storage types, files) and every column, rows stacked.
pub struct Read {
    pub info: serde_json::Value,
    pub columns: BTreeMap<String, Tensor>,
}

/// Reads the dataset in `dir` with Python `datasets`, which must succeed.
pub fn read_with_datasets(dir: &Path) -> Read {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/read_dataset.py");
    let out = tempfile::NamedTempFile::new().unwrap();
    let output = Command::new("python3")
        .arg(&script)
        .arg(dir)
        .arg(out.path())
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .output_within(RUN_DEADLINE);
    assert!(
        output.status.success(),
        "datasets.load_from_disk({}) failed: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let info = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let columns = candle_core::safetensors::load(out.path(), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    Read { info, columns }
}

/// Every file of `dir` by name, with its bytes.
pub fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Asserts that the directories hold the same files with the same bytes.
pub fn assert_same_files(a: &Path, b: &Path) {
    let (a_files, b_files) = (files(a), files(b));
    assert_eq!(
        a_files.keys().collect::<Vec<_>>(),
        b_files.keys().collect::<Vec<_>>(),
        "the files of {} and {}",
        a.display(),
        b.display()
    );
    for (name, bytes) in &a_files {
        assert!(
            bytes == &b_files[name],
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// `n` token ids below `vocab`, drawn from `seed`, in a tokens file of lines of 10.
pub fn tokens_file(n: usize, vocab: u32, seed: u64) -> (tempfile::NamedTempFile, Vec<u32>) {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let ids: Vec<u32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect();
    let text: String = ids
        .chunks(10)
        .map(|line| {
            let words: Vec<String> = line.iter().map(u32::to_string).collect();
            words.join(" ") + "\n"
        })
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    (file, ids)
}
