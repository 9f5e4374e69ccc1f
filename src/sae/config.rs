//! An SAE's `cfg.json`, as SAELens saves it (`SAE.save_model`): version 6's fields, and
//! the older ones (`activation_fn_str`, `activation_fn_kwargs`, a top-level
//! `hook_name`) where those still say the same thing. A field whose value would change
//! the math in a way not implemented here is refused by name.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// How the latents are activated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `relu(pre)` (SAELens's `standard`).
    Relu,
    /// The `k` largest pre-activations of each position, through ReLU, the others zero
    /// (`topk`); with `rescale_acts_by_decoder_norm`, chosen among the pre-activations
    /// times each latent's decoder norm, and divided by it again before decoding.
    TopK {
        /// Latents kept per position.
        k: usize,
        /// Whether the choice is made on pre-activations scaled by the decoder norms.
        rescale_acts_by_decoder_norm: bool,
    },
    /// `pre · [pre > threshold]` with a learned threshold per latent (`jumprelu`).
    JumpRelu,
}

/// How the input is normalized before encoding, and the reconstruction after decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalization {
    /// Neither. Also SAELens's `expected_average_only_in` and `covariance_whitening`,
    /// which it folds into the weights when it saves them and leaves out of an SAE's
    /// pass.
    None,
    /// `x · √d_in / ‖x‖` in, undone out (`constant_norm_rescale`).
    ConstantNormRescale,
    /// `(x − mean) / (std + 1e-5)` in, `· std + mean` out (`layer_norm`; std unbiased).
    LayerNorm,
}

/// An SAE's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct SaeConfig {
    /// The width of its input (the hooked activation's last dimension).
    pub d_in: usize,
    /// The number of latents.
    pub d_sae: usize,
    /// How the latents are activated.
    pub activation: Activation,
    /// Whether the decoder bias is subtracted from the input before encoding.
    pub apply_b_dec_to_input: bool,
    /// How the input and the reconstruction are normalized.
    pub normalization: Normalization,
    /// The hook point it was trained on, if the file says.
    pub hook_name: Option<String>,
}

impl SaeConfig {
    /// The bytes of f32 weights tensor-parallel rank `rank` of `tp` holds of this SAE:
    /// its latents' encoder columns, decoder rows, biases (and thresholds or decoder
    /// norms), and the whole decoder bias.
    pub fn share_bytes(&self, rank: usize, tp: usize) -> u64 {
        let latents = flexmodel_cluster::split_evenly(self.d_sae, tp)
            .get(rank)
            .map_or(0, |r| r.len());
        let per_latent = 2 * self.d_in
            + 1
            + match self.activation {
                Activation::Relu => 0,
                Activation::JumpRelu => 1,
                Activation::TopK {
                    rescale_acts_by_decoder_norm,
                    ..
                } => usize::from(rescale_acts_by_decoder_norm),
            };
        4 * (latents * per_latent + self.d_in) as u64
    }

    /// Reads `cfg.json` at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json(&json).map_err(|message| Error::BadConfig {
            path: path.to_path_buf(),
            message,
        })
    }

    /// The configuration a `cfg.json` object describes; an error naming the field that
    /// is missing, malformed or not supported.
    pub fn from_json(json: &Value) -> std::result::Result<Self, String> {
        let field = |name: &str| json.get(name).filter(|v| !v.is_null());
        let count = |name: &str| -> std::result::Result<usize, String> {
            let value = field(name).ok_or_else(|| format!("{name} is missing"))?;
            value
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| format!("{name} = {value} is not a positive integer"))
        };
        let flag = |name: &str, default: bool| -> std::result::Result<bool, String> {
            match field(name) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| format!("{name} = {v} is not true or false")),
            }
        };
        let text = |name: &str| field(name).and_then(Value::as_str);
        let refuse = |name: &str, value: &dyn std::fmt::Display, why: &str| {
            Err(format!("{name} = {value} is not supported: {why}"))
        };
        let (d_in, d_sae) = (count("d_in")?, count("d_sae")?);
        // SAELens 6 names the architecture; older files name the activation function.
        let architecture = match (text("architecture"), text("activation_fn_str")) {
            (Some(a), _) => a.to_string(),
            (None, Some("relu") | None) => "standard".to_string(),
            (None, Some("topk")) => "topk".to_string(),
            (None, Some(other)) => {
                return refuse("activation_fn_str", &other, "relu and topk are implemented");
            }
        };
        let activation = match architecture.as_str() {
            "standard" => Activation::Relu,
            "jumprelu" => Activation::JumpRelu,
            "topk" => {
                let kwargs = field("activation_fn_kwargs");
                let k = match (field("k"), kwargs.and_then(|k| k.get("k"))) {
                    (Some(_), _) => count("k")?,
                    (None, Some(k)) => k
                        .as_u64()
                        .filter(|&k| k > 0)
                        .map(|k| k as usize)
                        .ok_or_else(|| {
                            format!("activation_fn_kwargs.k = {k} is not a positive integer")
                        })?,
                    (None, None) => 100,
                };
                if k > d_sae {
                    return Err(format!("k = {k} is more than d_sae = {d_sae}"));
                }
                Activation::TopK {
                    k,
                    rescale_acts_by_decoder_norm: flag("rescale_acts_by_decoder_norm", false)?,
                }
            }
            other => {
                return refuse(
                    "architecture",
                    &format!("{other:?}"),
                    "standard, topk and jumprelu are implemented",
                );
            }
        };
        let normalization = match text("normalize_activations").unwrap_or("none") {
            "none" | "expected_average_only_in" | "covariance_whitening" => Normalization::None,
            "constant_norm_rescale" => Normalization::ConstantNormRescale,
            "layer_norm" => Normalization::LayerNorm,
            other => {
                return refuse(
                    "normalize_activations",
                    &format!("{other:?}"),
                    "none, expected_average_only_in, covariance_whitening, constant_norm_rescale \
                     and layer_norm are",
                );
            }
        };
        if let Some(reshape) = text("reshape_activations").filter(|r| *r != "none") {
            return refuse(
                "reshape_activations",
                &format!("{reshape:?}"),
                "an SAE reads its hook point's last dimension as it is",
            );
        }
        if flag("finetuning_scaling_factor", false)? {
            return refuse("finetuning_scaling_factor", &true, "it is not implemented");
        }
        if let Some(head) = field("hook_head_index") {
            return refuse("hook_head_index", head, "an SAE reads a whole hook point");
        }
        let metadata = field("metadata");
        let hook_name = metadata
            .and_then(|m| m.get("hook_name"))
            .or_else(|| field("hook_name"))
            .and_then(Value::as_str)
            .map(String::from);
        Ok(Self {
            d_in,
            d_sae,
            activation,
            apply_b_dec_to_input: flag("apply_b_dec_to_input", true)?,
            normalization,
            hook_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn saelens_6_configs_read_as_their_architecture() {
        let topk = json!({
            "architecture": "topk", "d_in": 576, "d_sae": 9216, "k": 32,
            "apply_b_dec_to_input": false, "normalize_activations": "layer_norm",
            "reshape_activations": "none", "dtype": "float32", "device": "cpu",
            "metadata": {"hook_name": "blocks.6.hook_resid_post", "model_name": "smollm2"},
        });
        let config = SaeConfig::from_json(&topk).unwrap();
        assert_eq!(
            config,
            SaeConfig {
                d_in: 576,
                d_sae: 9216,
                activation: Activation::TopK {
                    k: 32,
                    rescale_acts_by_decoder_norm: false
                },
                apply_b_dec_to_input: false,
                normalization: Normalization::LayerNorm,
                hook_name: Some("blocks.6.hook_resid_post".into()),
            }
        );
        let jumprelu = json!({"architecture": "jumprelu", "d_in": 8, "d_sae": 32});
        let config = SaeConfig::from_json(&jumprelu).unwrap();
        assert_eq!(config.activation, Activation::JumpRelu);
        assert!(config.apply_b_dec_to_input);
    }

    #[test]
    fn older_configs_name_the_activation_function() {
        let old = json!({
            "d_in": 8, "d_sae": 32, "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 4}, "hook_name": "blocks.1.hook_resid_pre",
            "finetuning_scaling_factor": false, "hook_head_index": null,
        });
        let config = SaeConfig::from_json(&old).unwrap();
        assert!(matches!(config.activation, Activation::TopK { k: 4, .. }));
        assert_eq!(config.hook_name.as_deref(), Some("blocks.1.hook_resid_pre"));
    }

    #[test]
    fn what_is_not_implemented_is_refused_by_name() {
        for (json, expected) in [
            (
                json!({"architecture": "gated", "d_in": 8, "d_sae": 32}),
                "architecture = \"gated\"",
            ),
            (
                json!({"d_in": 8, "d_sae": 32, "reshape_activations": "hook_z"}),
                "reshape_activations = \"hook_z\"",
            ),
            (
                json!({"d_in": 8, "d_sae": 32, "normalize_activations": "rms"}),
                "normalize_activations = \"rms\"",
            ),
            (
                json!({"d_in": 8, "d_sae": 32, "hook_head_index": 3}),
                "hook_head_index = 3",
            ),
            (json!({"d_in": 8}), "d_sae is missing"),
            (
                json!({"architecture": "topk", "d_in": 8, "d_sae": 4, "k": 5}),
                "k = 5 is more than d_sae = 4",
            ),
        ] {
            let err = SaeConfig::from_json(&json).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }
}
