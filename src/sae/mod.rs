//! Sparse autoencoders (and what SAELens saves of them) spliced at hook points, each
//! tensor-parallel rank holding its share of the latents.
//!
//! - [`config`]: an SAE's `cfg.json` (SAELens's architectures `standard`, `topk`,
//!   `jumprelu`, and its options that change the math);
//! - [`SparseAutoencoder`]: one rank's latents and the SAE's pass, with SAELens's hook
//!   sites ([`SaeSite`](crate::hooks::SaeSite));
//! - [`SaeAttachment`], [`ShardSaes`]: which SAEs a model has where, and one shard's
//!   shares of them spliced into its hooks.

mod autoencoder;
pub mod config;
mod splice;

use std::path::Path;

use flexmodel_cluster::{TpRank, split_evenly};

pub use autoencoder::{SaeWeights, SparseAutoencoder};
pub use config::{Activation, Normalization, SaeConfig};
pub use splice::{SaeAttachment, ShardSaes, SplicedHooks, splice_all};
pub(crate) use splice::{describe, parse_description};

use crate::weights::{SafetensorsDir, WeightSource};
use crate::{Error, Result};

/// The file SAELens writes an SAE's configuration to.
pub const CONFIG_FILE: &str = "cfg.json";
/// The file SAELens writes an SAE's weights to.
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";

impl SparseAutoencoder {
    /// Loads `tp`'s share of the latents of the SAE SAELens saved in `dir` (`cfg.json`
    /// and `sae_weights.safetensors`), reading only those latents' columns and rows.
    pub fn load(dir: &Path, tp: TpRank) -> Result<Self> {
        let config = SaeConfig::read(&dir.join(CONFIG_FILE))?;
        let source = SafetensorsDir::open_file(dir, WEIGHTS_FILE)?;
        let latents = split_evenly(config.d_sae, tp.size())[tp.rank()].clone();
        if latents.is_empty() {
            return Err(Error::InvalidArgument {
                argument: "sae",
                problem: format!("{} has no latents for rank {}", dir.display(), tp.rank()),
            });
        }
        let (d_in, d_sae) = (config.d_in, config.d_sae);
        let dtype = candle_core::DType::F32;
        let read = |name: &str, shape: &[usize], dim: usize| {
            source.tensor_slice(name, shape, Some((dim, latents.clone())), dtype)
        };
        let threshold = match config.activation {
            Activation::JumpRelu => Some(match source.names().iter().any(|n| n == "threshold") {
                true => read("threshold", &[d_sae], 0)?,
                // A training SAE's state holds the threshold's logarithm.
                false => read("log_threshold", &[d_sae], 0)?.exp()?,
            }),
            _ => None,
        };
        let weights = SaeWeights {
            w_enc: read("W_enc", &[d_in, d_sae], 1)?,
            b_enc: read("b_enc", &[d_sae], 0)?,
            w_dec: read("W_dec", &[d_sae, d_in], 0)?,
            b_dec: source.tensor_slice("b_dec", &[d_in], None, dtype)?,
            threshold,
        };
        SparseAutoencoder::new(config, latents, weights)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::weights::write_safetensors;

    #[test]
    fn a_rank_reads_its_latents_columns_and_rows_and_the_whole_decoder_bias() {
        let dir = tempfile::tempdir().unwrap();
        let config = r#"{"architecture": "jumprelu", "d_in": 4, "d_sae": 6,
            "metadata": {"hook_name": "blocks.0.hook_resid_post"}}"#;
        std::fs::write(dir.path().join(CONFIG_FILE), config).unwrap();
        let cpu = &Device::Cpu;
        let arange = |n: usize, shape: &[usize]| {
            Tensor::arange(0f32, n as f32, cpu)
                .unwrap()
                .reshape(shape)
                .unwrap()
        };
        let tensors = HashMap::from([
            ("W_enc".to_string(), arange(24, &[4, 6])),
            ("b_enc".to_string(), arange(6, &[6])),
            ("W_dec".to_string(), arange(24, &[6, 4])),
            ("b_dec".to_string(), arange(4, &[4])),
            ("log_threshold".to_string(), arange(6, &[6])),
        ]);
        write_safetensors(&tensors, &dir.path().join(WEIGHTS_FILE)).unwrap();
        let sae = SparseAutoencoder::load(dir.path(), TpRank::new(1, 3).unwrap()).unwrap();
        assert_eq!(sae.latents(), 2..4);
        assert_eq!(
            sae.config().hook_name.as_deref(),
            Some("blocks.0.hook_resid_post")
        );
        let w = &sae.weights;
        assert_eq!(w.w_enc.to_vec2::<f32>().unwrap()[0], [2.0, 3.0]);
        assert_eq!(w.w_dec.to_vec2::<f32>().unwrap()[0], [8.0, 9.0, 10.0, 11.0]);
        assert_eq!(w.b_dec.dims(), [4]);
        let threshold = w.threshold.as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert!((threshold[0] - 2f32.exp()).abs() < 1e-5);
        let missing = SparseAutoencoder::load(&dir.path().join("nowhere"), TpRank::SOLE);
        assert!(missing.unwrap_err().to_string().contains("cfg.json"));
    }
}
