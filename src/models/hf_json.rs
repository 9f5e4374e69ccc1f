//! The parts of a Hugging Face `config.json` that every family reads alike: token ids,
//! RoPE scaling, and reading the file.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::hooks::Sizes;
use crate::models::RopeScaling;
use crate::{Error, Result};

/// The `config.json` at `path`, as `T`; an error naming the file if it is not one.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// An error naming `source` unless `sizes` and `n_layers` describe a buildable decoder:
/// every size positive, query heads a multiple of key/value heads, heads of even width
/// (RoPE rotates pairs). The names are `config.json`'s.
pub(crate) fn check_sizes(sizes: Sizes, n_layers: usize, source: &Path) -> Result<()> {
    let fail = |message: String| {
        Err(Error::BadConfig {
            path: source.to_path_buf(),
            message,
        })
    };
    let positive = [
        ("vocab_size", sizes.vocab_size),
        ("hidden_size", sizes.d_model),
        ("num_hidden_layers", n_layers),
        ("num_attention_heads", sizes.n_heads),
        ("num_key_value_heads", sizes.n_kv_heads),
        ("head_dim", sizes.d_head),
        ("intermediate_size", sizes.d_mlp),
    ];
    for (name, value) in positive {
        if value == 0 {
            return fail(format!("{name} must be positive"));
        }
    }
    if !sizes.n_heads.is_multiple_of(sizes.n_kv_heads) {
        return fail(format!(
            "num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
            sizes.n_heads, sizes.n_kv_heads
        ));
    }
    if !sizes.d_head.is_multiple_of(2) {
        return fail(format!("head_dim = {} must be even for RoPE", sizes.d_head));
    }
    Ok(())
}

/// `eos_token_id` is a single id or a list of ids.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids, as a list.
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }

    /// `ids` as `config.json` writes them: none, one, or a list.
    pub(crate) fn of(ids: &[u32]) -> Option<Self> {
        match ids {
            [] => None,
            [id] => Some(TokenIds::One(*id)),
            ids => Some(TokenIds::Many(ids.to_vec())),
        }
    }
}

/// The scaling a `rope_scaling` object describes (`rope_type`, or the older `type`);
/// `None` for none or `default`; an error naming what is unsupported or missing.
pub(crate) fn rope_scaling_of(
    json: Option<&serde_json::Value>,
) -> std::result::Result<Option<RopeScaling>, String> {
    let Some(json) = json.filter(|j| !j.is_null()) else {
        return Ok(None);
    };
    let kind = json
        .get("rope_type")
        .or_else(|| json.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let number = |key: &str| {
        json.get(key)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| format!("RoPE scaling ({json}) of type {kind} needs a number {key:?}"))
    };
    Ok(Some(match kind {
        "default" => return Ok(None),
        "linear" => RopeScaling::Linear {
            factor: number("factor")?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: number("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")? as usize,
        },
        _ => {
            return Err(format!(
                "RoPE scaling ({json}) is not supported: implemented are linear, dynamic and llama3"
            ));
        }
    }))
}

/// `scaling` as a `rope_scaling` object.
pub(crate) fn rope_scaling_json(scaling: &RopeScaling) -> serde_json::Value {
    match *scaling {
        RopeScaling::Linear { factor } => {
            serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        RopeScaling::Dynamic { factor } => {
            serde_json::json!({"rope_type": "dynamic", "factor": factor})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => serde_json::json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    }
}
