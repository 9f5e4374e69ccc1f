//! Dropping a sharded model stops its shard threads and frees their weights.

use std::time::{Duration, Instant};

use flexmodel::tiny::tiny_checkpoint;
use flexmodel::{FlexModel, Layout};

/// The number of threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn dropping_a_sharded_model_stops_its_shard_threads() {
    let checkpoint = tiny_checkpoint(3).unwrap();
    let before = threads();
    let model = FlexModel::build(&checkpoint, Layout::new(2, 2, 2).unwrap()).unwrap();
    assert!(threads() >= before + 8, "one thread per rank");
    drop(model);
    let start = Instant::now();
    while threads() > before && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(threads(), before, "every shard thread ended");
}
