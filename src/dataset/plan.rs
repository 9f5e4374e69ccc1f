//! The plan of a dataset, worked out before any pass: its columns and their row shapes,
//! its rows, how they fall into shards of a bounded size, and the manifest that a
//! resumed run must match.
//!
//! Shard `s` holds rows `s·R .. (s+1)·R` (the last one fewer), `R` a multiple of the
//! batch where a shard holds a batch or more; a pass never spans two shards, so a run
//! resumed at a shard computes every batch exactly as an uninterrupted run does.

use std::ops::Range;

use flexmodel_actors::PassScope;

use crate::dataset::corpus::Corpus;
use crate::dataset::spec::{DatasetSpec, Positions};
use crate::hooks::HookKind;
use crate::models::ModelConfig;
use crate::{Error, HookCatalog, HookPoint, Result};

/// One hook column: the point, its name, and the shape of one row of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    point: HookPoint,
    name: String,
    shape: Vec<usize>,
}

impl Column {
    /// The hook point.
    pub fn point(&self) -> HookPoint {
        self.point
    }

    /// The column's name: the hook point's.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shape of one row: `[positions, d]`, every dimension after the position
    /// flattened into `d` (heads first, as SAELens stores `hook_z`); attention scores and
    /// patterns `[heads, positions, seq_len]`.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values of one row.
    pub fn values_per_row(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Everything a dataset's writing needs to know, checked.
#[derive(Debug)]
pub struct DatasetPlan {
    pub(crate) spec: DatasetSpec,
    pub(crate) corpus: Corpus,
    columns: Vec<Column>,
    rows: usize,
    rows_per_shard: usize,
    shards: usize,
    pub(crate) manifest: Manifest,
    scope: PassScope,
}

/// The bytes an Arrow stream spends besides the rows' buffers: the schema message (a
/// bound from the names and the extension metadata) and, per record batch, its message
/// and each buffer's padding to 64 bytes.
const SCHEMA_BYTES: u64 = 4096;
const SCHEMA_BYTES_PER_COLUMN: u64 = 512;
const RECORD_BATCH_BYTES: u64 = 1024;
const BYTES_PER_BUFFER: u64 = 96;

impl DatasetPlan {
    /// The plan of `spec` over `corpus` for a model of `config`: the hook patterns
    /// resolved (an unknown one is an error suggesting names), the corpus cut into
    /// whole sequences within `spec.max_tokens`, the rows into shards that fit in
    /// `spec.shard_bytes`.
    pub fn new(config: &ModelConfig, corpus: Corpus, spec: DatasetSpec) -> Result<Self> {
        let invalid = |argument, problem: String| Error::InvalidArgument { argument, problem };
        if spec.seq_len == 0 {
            return Err(invalid("seq_len", "must be at least 1".into()));
        }
        if spec.seq_len > config.context() {
            return Err(Error::SequenceTooLong {
                len: spec.seq_len,
                context: config.context(),
            });
        }
        if spec.batch == 0 {
            return Err(invalid("batch", "must be at least 1".into()));
        }
        if spec.hooks.is_empty() {
            return Err(invalid("hooks", "name at least one hook point".into()));
        }
        let columns = columns(config, &spec)?;
        let tokens = corpus.len().min(spec.max_tokens.unwrap_or(usize::MAX));
        let rows = tokens / spec.seq_len;
        if rows == 0 {
            return Err(Error::CorpusTooShort {
                tokens,
                seq_len: spec.seq_len,
            });
        }
        let rows_per_shard = rows_per_shard(&columns, &spec)?;
        let shards = rows.div_ceil(rows_per_shard);
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            model: spec.model.clone(),
            corpus_tokens: rows * spec.seq_len,
            corpus_sha256: corpus.fingerprint(rows * spec.seq_len)?,
            hooks: columns.iter().map(|c| c.name.clone()).collect(),
            edits: spec.edits.clone(),
            saes: spec.saes.iter().map(ToString::to_string).collect(),
            seq_len: spec.seq_len,
            batch: spec.batch,
            positions: spec.positions,
            dtype: spec.dtype,
            shard_bytes: spec.shard_bytes,
            rows,
            rows_per_shard,
            shards,
        };
        Ok(Self {
            spec,
            corpus,
            columns,
            rows,
            rows_per_shard,
            shards,
            manifest,
            scope: PassScope::FULL,
        })
    }

    /// The options it was made from.
    pub fn spec(&self) -> &DatasetSpec {
        &self.spec
    }

    /// This plan with its passes running as much of the model as `scope` says (the
    /// captured values are the same; a pass that stops early, or gathers no logits,
    /// is cheaper).
    pub fn with_scope(self, scope: PassScope) -> Self {
        Self { scope, ..self }
    }

    /// How much of the model each pass runs.
    pub fn scope(&self) -> PassScope {
        self.scope
    }

    /// The hook columns, in forward order (the dataset also has `token_ids` first).
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The rows (sequences) of the finished dataset.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The tokens of those rows.
    pub fn tokens(&self) -> usize {
        self.rows * self.spec.seq_len
    }

    /// The shard files of the finished dataset.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The rows of every shard but the last.
    pub fn rows_per_shard(&self) -> usize {
        self.rows_per_shard
    }

    /// The bytes of the stored values of one row, token ids included.
    pub fn row_bytes(&self) -> u64 {
        row_payload_bytes(&self.columns, &self.spec)
    }

    /// The rows of shard `shard`.
    pub(crate) fn shard_rows(&self, shard: usize) -> Range<usize> {
        let start = shard * self.rows_per_shard;
        start..(start + self.rows_per_shard).min(self.rows)
    }

    /// The batches of shard `shard`, in order: row ranges of at most the batch size.
    pub(crate) fn batches(&self, shard: usize) -> impl Iterator<Item = Range<usize>> + use<> {
        let rows = self.shard_rows(shard);
        let batch = self.spec.batch;
        (rows.start..rows.end)
            .step_by(batch)
            .map(move |start| start..(start + batch).min(rows.end))
    }

    /// The rows of every pass, in order, shard after shard.
    pub fn passes(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        (0..self.shards).flat_map(|shard| self.batches(shard))
    }

    /// The file name of shard `shard`, as `datasets.save_to_disk` names it.
    pub(crate) fn file_name(&self, shard: usize) -> String {
        format!("data-{shard:05}-of-{:05}.arrow", self.shards)
    }
}

/// The hook columns `spec.hooks` names, in forward order, once each.
fn columns(config: &ModelConfig, spec: &DatasetSpec) -> Result<Vec<Column>> {
    let (points, _) = crate::sae::splice_all(config.points(), &spec.saes)?;
    let catalog = HookCatalog::new(points);
    let mut points = Vec::new();
    for pattern in &spec.hooks {
        points.extend(catalog.resolve(pattern, HookKind::Forward)?);
    }
    points.sort_by_key(|&p| catalog.points().index(p));
    points.dedup();
    let (t, kept) = match spec.positions {
        Positions::All => (spec.seq_len, spec.seq_len),
        Positions::Last => (spec.seq_len, 1),
    };
    Ok(points
        .into_iter()
        .map(|point| {
            let full = catalog.points().shape(point, 1, t);
            let shape = match point.attends() {
                true => vec![full[1], kept, t],
                false => vec![kept, full[2..].iter().product()],
            };
            Column {
                point,
                name: point.to_string(),
                shape,
            }
        })
        .collect())
}

/// The bytes of one row's buffers: its token ids, and per column its values and the
/// 4-byte offsets of its nested lists (one list of `shape[0]`, each of `shape[1]`, ...).
fn row_payload_bytes(columns: &[Column], spec: &DatasetSpec) -> u64 {
    let tokens = 4 * spec.seq_len as u64;
    let hooks: u64 = columns
        .iter()
        .map(|c| {
            let values = c.values_per_row() as u64 * spec.dtype.size() as u64;
            let mut lists = 1;
            let mut offsets = 0;
            for &d in &c.shape[..c.shape.len() - 1] {
                offsets += 4 * lists;
                lists *= d as u64;
            }
            values + offsets + 4 * lists
        })
        .sum();
    tokens + hooks
}

/// The most rows of a shard whose file stays within `spec.shard_bytes`, a multiple of
/// the batch if a shard holds a batch or more.
fn rows_per_shard(columns: &[Column], spec: &DatasetSpec) -> Result<usize> {
    let row = row_payload_bytes(columns, spec);
    let buffers = 3 + columns
        .iter()
        .map(|c| 2 * c.shape.len() as u64 + 2)
        .sum::<u64>();
    let per_batch = RECORD_BATCH_BYTES + BYTES_PER_BUFFER * buffers;
    let schema = SCHEMA_BYTES
        + columns
            .iter()
            .map(|c| SCHEMA_BYTES_PER_COLUMN + 2 * c.name.len() as u64)
            .sum::<u64>();
    let batch = spec.batch as u64;
    let size = |rows: u64| schema + rows.div_ceil(batch) * per_batch + rows * row;
    let mut rows = spec.shard_bytes.saturating_sub(schema) / (row + per_batch.div_ceil(batch));
    while rows > 0 && size(rows) > spec.shard_bytes {
        rows -= 1;
    }
    if rows == 0 {
        return Err(Error::RowTooLarge {
            row_bytes: size(1),
            shard_bytes: spec.shard_bytes,
        });
    }
    if rows >= batch {
        rows -= rows % batch;
    }
    Ok(rows as usize)
}

/// The version of the manifest's layout.
const MANIFEST_FORMAT: u32 = 1;

/// What a dataset was made from, kept beside it (`flexmodel_cache.json`): a run resumes
/// a dataset only if its manifest is equal.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Manifest {
    format: u32,
    model: String,
    corpus_tokens: usize,
    corpus_sha256: String,
    hooks: Vec<String>,
    edits: Vec<String>,
    /// The SAEs spliced in, `DIR@HOOK` each (absent without any, as before there were).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    saes: Vec<String>,
    seq_len: usize,
    batch: usize,
    positions: Positions,
    dtype: crate::dataset::spec::StoredDType,
    shard_bytes: u64,
    rows: usize,
    rows_per_shard: usize,
    shards: usize,
}

impl Manifest {
    /// Each field that differs from `here`: `NAME X there, Y here`.
    pub(crate) fn differences(&self, here: &Manifest) -> Vec<String> {
        let (there, here) = (
            serde_json::to_value(self).unwrap_or_default(),
            serde_json::to_value(here).unwrap_or_default(),
        );
        let (Some(there), Some(here)) = (there.as_object(), here.as_object()) else {
            return Vec::new();
        };
        here.iter()
            .filter(|(key, value)| there.get(*key) != Some(value))
            .map(|(key, value)| {
                let was = there.get(key).map(short).unwrap_or_else(|| "none".into());
                format!("{key} {was} there, {} here", short(value))
            })
            .collect()
    }
}

/// A value for a message, cut to 60 characters.
fn short(value: &serde_json::Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::spec::StoredDType;
    use crate::tiny::tiny_config;

    fn plan(tokens: usize, edit: impl FnOnce(&mut DatasetSpec)) -> Result<DatasetPlan> {
        let mut spec = DatasetSpec::new("model", ["blocks.*.hook_resid_post"]);
        spec.seq_len = 16;
        spec.batch = 4;
        edit(&mut spec);
        let corpus = Corpus::from_ids((0..tokens as u32).map(|i| i % 256).collect());
        DatasetPlan::new(&tiny_config().into(), corpus, spec)
    }

    #[test]
    fn shards_hold_whole_batches_within_their_size_and_passes_never_span_two() {
        // 4 layers × 16 positions × 64 × 4 bytes = 16 KiB a row, and its offsets.
        let plan = plan(100 * 16 + 7, |s| s.shard_bytes = 200_000).unwrap();
        assert_eq!(plan.rows(), 100);
        assert_eq!(plan.row_bytes(), 16 * 4 + 4 * (16 * 64 * 4 + 4 * 17));
        let r = plan.rows_per_shard();
        assert_eq!(r % 4, 0);
        assert!(r as u64 * plan.row_bytes() < 200_000);
        assert!(
            (r + 4) as u64 * plan.row_bytes() > 200_000 - 20_000,
            "{r} rows"
        );
        assert_eq!(plan.shards(), 100usize.div_ceil(r));
        let mut next = 0;
        for shard in 0..plan.shards() {
            for rows in plan.batches(shard) {
                assert_eq!(rows.start, next);
                assert!(rows.len() <= 4 && plan.shard_rows(shard).contains(&(rows.end - 1)));
                next = rows.end;
            }
        }
        assert_eq!(next, 100);
        assert_eq!(
            plan.file_name(2),
            format!("data-00002-of-{:05}", plan.shards()) + ".arrow"
        );
    }

    #[test]
    fn columns_keep_positions_first_and_flatten_the_rest() {
        let plan = plan(64, |s| {
            s.hooks = vec![
                "blocks.1.attn.hook_pattern".into(),
                "blocks.0.attn.hook_q".into(),
                "blocks.0.attn.hook_q".into(),
            ];
            s.positions = Positions::Last;
        })
        .unwrap();
        let shapes: Vec<(&str, &[usize])> = plan
            .columns()
            .iter()
            .map(|c| (c.name(), c.shape()))
            .collect();
        assert_eq!(
            shapes,
            [
                ("blocks.0.attn.hook_q", &[1, 64][..]),
                ("blocks.1.attn.hook_pattern", &[8, 1, 16][..])
            ]
        );
    }

    #[test]
    fn impossible_plans_are_refused_saying_why() {
        let e = plan(15, |_| {}).unwrap_err().to_string();
        assert!(
            e.contains("15 tokens to use, fewer than one sequence of 16"),
            "{e}"
        );
        let e = plan(1000, |s| s.max_tokens = Some(10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("10 tokens to use"), "{e}");
        let e = plan(1000, |s| s.shard_bytes = 10_000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("more than a shard of at most 10000 bytes"),
            "{e}"
        );
        let e = plan(1000, |s| s.hooks = vec!["blocks.0.hook_resid_pots".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("blocks.0.hook_resid_post"), "{e}");
        assert!(plan(1000, |s| s.batch = 0).is_err());
        assert!(plan(1000, |s| s.seq_len = 0).is_err());
    }

    #[test]
    fn manifests_name_each_argument_that_differs() {
        let a = plan(1000, |_| {}).unwrap();
        let b = plan(1000, |s| s.dtype = StoredDType::Bf16).unwrap();
        assert!(a.manifest.differences(&a.manifest).is_empty());
        // Half the bytes a value: more rows a shard.
        assert_eq!(
            b.manifest.differences(&a.manifest),
            [
                "dtype \"bf16\" there, \"f32\" here",
                "rows_per_shard 6784 there, 3628 here"
            ]
        );
        let c = plan(2000, |_| {}).unwrap();
        let differences = c.manifest.differences(&a.manifest).join("; ");
        for field in [
            "corpus_tokens 2000 there, 992 here",
            "corpus_sha256",
            "rows 125 there, 62 here",
        ] {
            assert!(differences.contains(field), "{differences}");
        }
    }
}
