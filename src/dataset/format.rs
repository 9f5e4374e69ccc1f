//! The files `datasets.load_from_disk` reads, as `datasets.save_to_disk` writes them:
//! Arrow IPC streams of record batches, `dataset_info.json` with the features, and
//! `state.json` listing the Arrow files.
//!
//! The columns are `token_ids`, `fixed_size_list<int32>[T]` (the feature
//! `List(Value("int32"), length=T)`), then one per hook point, an `ArrayND` feature:
//! nested `list<…list<float32>>` whose field carries the extension
//! `datasets.features.features.ArrayNDExtensionType` with the metadata
//! `[[shape], "float32"]`. The schema also carries the features under `huggingface`, as
//! `datasets` writes them.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{
    ArrayRef, FixedSizeListArray, Float16Array, Float32Array, Int32Array, ListArray, RecordBatch,
};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{ArrowError, DataType, Field, FieldRef, Schema, SchemaRef};
use candle_core::{DType, Tensor};
use half::{bf16, f16};
use serde::ser::{Serialize, SerializeMap, Serializer};
use sha2::{Digest, Sha256};

use crate::dataset::plan::{Column, DatasetPlan};
use crate::dataset::spec::StoredDType;
use crate::weights::fingerprint::hex;
use crate::{Error, Result};

/// The stored values of one hook column over some rows, row after row.
pub(crate) enum Values {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Values {
    /// The values of `tensor` (a column's rows, any shape) stored as `dtype`; `column`
    /// names the hook point in an error.
    pub(crate) fn of(tensor: &Tensor, dtype: StoredDType, column: &Column) -> Result<Self> {
        let values = tensor
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        match dtype {
            StoredDType::F32 => Ok(Values::F32(values)),
            StoredDType::Bf16 => values
                .into_iter()
                .map(|v| {
                    let stored = f16::from_f32(bf16::from_f32(v).to_f32());
                    match stored.is_infinite() && v.is_finite() {
                        true => Err(Error::Float16Overflow {
                            hook: column.name().to_string(),
                            value: v,
                        }),
                        false => Ok(stored),
                    }
                })
                .collect::<Result<_>>()
                .map(Values::F16),
        }
    }

    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
        }
    }

    fn into_array(self) -> ArrayRef {
        match self {
            Values::F32(v) => Arc::new(Float32Array::from(v)),
            Values::F16(v) => Arc::new(Float16Array::from(v)),
        }
    }
}

/// The Arrow schema of `plan`'s files.
pub(crate) fn schema(plan: &DatasetPlan) -> SchemaRef {
    let seq_len = plan.spec().seq_len;
    let value = match plan.spec().dtype {
        StoredDType::F32 => DataType::Float32,
        StoredDType::Bf16 => DataType::Float16,
    };
    let mut fields = vec![Field::new(
        "token_ids",
        DataType::FixedSizeList(item(DataType::Int32), seq_len as i32),
        true,
    )];
    for column in plan.columns() {
        let dtype = plan.spec().dtype.feature_dtype();
        let metadata = HashMap::from([
            (
                "ARROW:extension:name".to_string(),
                format!(
                    "datasets.features.features.Array{}DExtensionType",
                    column.shape().len()
                ),
            ),
            (
                "ARROW:extension:metadata".to_string(),
                format!("[[{}], \"{dtype}\"]", join(column.shape())),
            ),
        ]);
        let nested = (0..column.shape().len()).fold(value.clone(), |t, _| DataType::List(item(t)));
        fields.push(Field::new(column.name(), nested, true).with_metadata(metadata));
    }
    let huggingface = serde_json::json!({"info": {"features": Features(plan)}});
    let metadata = HashMap::from([("huggingface".to_string(), huggingface.to_string())]);
    Arc::new(Schema::new_with_metadata(fields, metadata))
}

/// The record batch of rows with `tokens` (row after row) and each hook column's values.
pub(crate) fn record_batch(
    schema: &SchemaRef,
    plan: &DatasetPlan,
    tokens: &[u32],
    columns: Vec<Values>,
) -> Result<RecordBatch> {
    let seq_len = plan.spec().seq_len;
    let rows = tokens.len() / seq_len;
    let ids: Vec<i32> = tokens.iter().map(|&id| id as i32).collect();
    let ids = FixedSizeListArray::try_new(
        item(DataType::Int32),
        seq_len as i32,
        Arc::new(Int32Array::from(ids)),
        None,
    )
    .map_err(arrow_error)?;
    let mut arrays: Vec<ArrayRef> = vec![Arc::new(ids)];
    for (column, values) in plan.columns().iter().zip(columns) {
        if values.len() != rows * column.values_per_row() {
            return Err(Error::Internal(
                "a hook column's values do not fill its rows",
            ));
        }
        arrays.push(nested(values.into_array(), column.shape(), rows)?);
    }
    RecordBatch::try_new(schema.clone(), arrays).map_err(arrow_error)
}

/// `values` as `rows` nested lists of `shape`, the innermost lists first.
fn nested(values: ArrayRef, shape: &[usize], rows: usize) -> Result<ArrayRef> {
    let mut array = values;
    for level in (0..shape.len()).rev() {
        let lists = rows * shape[..level].iter().product::<usize>();
        let offsets = OffsetBuffer::<i32>::try_from_repeated_length(shape[level], lists)
            .map_err(|_| Error::Internal("a record batch of more than 2^31 values"))?;
        let field = item(array.data_type().clone());
        array = Arc::new(ListArray::try_new(field, offsets, array, None).map_err(arrow_error)?);
    }
    Ok(array)
}

/// The child field of a list, as pyarrow names it.
fn item(data_type: DataType) -> FieldRef {
    Arc::new(Field::new("item", data_type, true))
}

fn arrow_error(e: ArrowError) -> Error {
    Error::Internal(match e {
        ArrowError::InvalidArgumentError(_) => "an Arrow array that does not fit its schema",
        _ => "building an Arrow record batch",
    })
}

/// `dataset_info.json`: the features, and what the dataset holds.
pub(crate) fn dataset_info_json(plan: &DatasetPlan) -> String {
    let spec = plan.spec();
    let info = DatasetInfo {
        citation: "",
        description: format!(
            "Activations of {} hook points over {} sequences of {} tokens ({} positions, {}), cached by flexmodel",
            plan.columns().len(),
            plan.rows(),
            spec.seq_len,
            spec.positions,
            spec.dtype
        ),
        features: Features(plan),
        homepage: "",
        license: "",
    };
    pretty(&info)
}

/// `state.json` listing the first `complete` shards of `plan`.
pub(crate) fn state_json(plan: &DatasetPlan, complete: usize) -> String {
    let mut hasher = Sha256::new();
    hasher.update(pretty(&plan.manifest));
    hasher.update(complete.to_le_bytes());
    let state = serde_json::json!({
        "_data_files": (0..complete)
            .map(|s| serde_json::json!({"filename": plan.file_name(s)}))
            .collect::<Vec<_>>(),
        "_fingerprint": hex(hasher)[..16],
        "_format_columns": null,
        "_format_kwargs": {},
        "_format_type": null,
        "_output_all_columns": false,
        "_split": null,
    });
    pretty(&state)
}

/// The file names `state_json` lists, in order.
pub(crate) fn listed_files(state: &str) -> Option<Vec<String>> {
    let state: serde_json::Value = serde_json::from_str(state).ok()?;
    state
        .get("_data_files")?
        .as_array()?
        .iter()
        .map(|f| Some(f.get("filename")?.as_str()?.to_string()))
        .collect()
}

/// `value` as JSON indented by two spaces, as `datasets` writes its files.
pub(crate) fn pretty(value: &impl Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn join(shape: &[usize]) -> String {
    shape
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(serde::Serialize)]
struct DatasetInfo<'a> {
    citation: &'static str,
    description: String,
    features: Features<'a>,
    homepage: &'static str,
    license: &'static str,
}

/// The features of a plan's columns, in their order.
struct Features<'a>(&'a DatasetPlan);

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Feature {
    List {
        feature: ValueFeature,
        length: usize,
        #[serde(rename = "_type")]
        kind: &'static str,
    },
    Array {
        shape: Vec<usize>,
        dtype: &'static str,
        #[serde(rename = "_type")]
        kind: String,
    },
}

#[derive(serde::Serialize)]
struct ValueFeature {
    dtype: &'static str,
    #[serde(rename = "_type")]
    kind: &'static str,
}

impl Serialize for Features<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let plan = self.0;
        let mut map = serializer.serialize_map(Some(plan.columns().len() + 1))?;
        let ids = Feature::List {
            feature: ValueFeature {
                dtype: "int32",
                kind: "Value",
            },
            length: plan.spec().seq_len,
            kind: "List",
        };
        map.serialize_entry("token_ids", &ids)?;
        for column in plan.columns() {
            let array = Feature::Array {
                shape: column.shape().to_vec(),
                dtype: plan.spec().dtype.feature_dtype(),
                kind: format!("Array{}D", column.shape().len()),
            };
            map.serialize_entry(column.name(), &array)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Corpus, DatasetSpec};
    use crate::tiny::tiny_config;

    fn plan() -> DatasetPlan {
        let mut spec = DatasetSpec::new("model", ["blocks.0.hook_resid_post"]);
        spec.seq_len = 4;
        let corpus = Corpus::from_ids((0..40).collect());
        DatasetPlan::new(&tiny_config().into(), corpus, spec).unwrap()
    }

    #[test]
    fn the_features_are_those_datasets_writes() {
        // What `datasets.Dataset.save_to_disk` (5.2) writes for these features.
        let python = r#"{
            "token_ids": {"feature": {"dtype": "int32", "_type": "Value"}, "length": 4, "_type": "List"},
            "blocks.0.hook_resid_post": {"shape": [4, 64], "dtype": "float32", "_type": "Array2D"}
        }"#;
        let text = dataset_info_json(&plan());
        let info: serde_json::Value = serde_json::from_str(&text).unwrap();
        let python: serde_json::Value = serde_json::from_str(python).unwrap();
        assert_eq!(info["features"], python);
        // In the order of the Arrow columns.
        let at = |key: &str| text.find(&format!("\"{key}\"")).unwrap();
        assert!(at("token_ids") < at("blocks.0.hook_resid_post"), "{text}");
    }

    #[test]
    fn the_state_lists_the_complete_shards_as_datasets_does() {
        let plan = plan();
        let state = state_json(&plan, 1);
        let value: serde_json::Value = serde_json::from_str(&state).unwrap();
        assert_eq!(
            listed_files(&state).unwrap(),
            [format!("data-00000-of-{:05}.arrow", plan.shards())]
        );
        for (key, expected) in [
            ("_format_columns", serde_json::Value::Null),
            ("_format_kwargs", serde_json::json!({})),
            ("_format_type", serde_json::Value::Null),
            ("_output_all_columns", serde_json::json!(false)),
            ("_split", serde_json::Value::Null),
        ] {
            assert_eq!(value[key], expected, "{key}");
        }
        assert_ne!(state_json(&plan, 1), state_json(&plan, 0));
        assert_eq!(state_json(&plan, 1), state);
    }

    #[test]
    fn hook_columns_carry_the_array_extension_of_datasets() {
        let schema = schema(&plan());
        let field = schema.field_with_name("blocks.0.hook_resid_post").unwrap();
        assert_eq!(
            field.metadata()["ARROW:extension:name"],
            "datasets.features.features.Array2DExtensionType"
        );
        assert_eq!(
            field.metadata()["ARROW:extension:metadata"],
            "[[4, 64], \"float32\"]"
        );
        assert_eq!(
            field.data_type(),
            &DataType::List(item(DataType::List(item(DataType::Float32))))
        );
    }
}
