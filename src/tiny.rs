//! A tiny random LLaMA for fast tests: 4 layers, d_model 64, 8 heads, 4 key/value
//! heads, a 256-token byte-level vocabulary. Head, hidden and vocabulary counts split
//! evenly over 2 and 4 tensor-parallel ranks.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use crate::Result;
use crate::models::{Architecture, LlamaConfig};
use crate::text::tokenizer::Tokenizer;
use crate::weights::TensorMap;
use crate::weights::checkpoint::Checkpoint;

/// The tiny configuration.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        architecture: Architecture::Llama,
        vocab_size: 256,
        d_model: 64,
        n_layers: 4,
        n_heads: 8,
        n_kv_heads: 4,
        d_head: 8,
        d_mlp: 192,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: false,
        attention_bias: false,
        max_position_embeddings: 512,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

/// The tiny model with weights drawn from `seed`: the same seed gives the same model.
pub fn tiny_checkpoint(seed: u64) -> Result<Checkpoint> {
    random_checkpoint(tiny_config(), seed)
}

/// A model of any configuration with random weights drawn from `seed` and the
/// byte-level tokenizer (the vocabulary must have at least 256 tokens).
pub fn random_checkpoint(config: LlamaConfig, seed: u64) -> Result<Checkpoint> {
    if config.vocab_size < 256 {
        return Err(crate::Error::InvalidArgument {
            argument: "config",
            problem: format!(
                "a random model needs a vocabulary of at least 256 byte tokens, got {}",
                config.vocab_size
            ),
        });
    }
    let weights = random_weights(&config, seed)?;
    Ok(Checkpoint {
        config,
        weights: Box::new(weights),
        tokenizer: byte_tokenizer()?,
    })
}

/// Gaussian weights: linears with std 1/√fan_in, norms around 1, unit embeddings.
fn random_weights(c: &LlamaConfig, seed: u64) -> Result<TensorMap> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut draw = |shape: &[usize], mean: f32, std: f32| -> Result<Tensor> {
        let normal = Normal::new(mean, std).map_err(|e| crate::Error::InvalidArgument {
            argument: "config",
            problem: format!("weights with std {std}: {e}"),
        })?;
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    };
    let linear = |out: usize, inp: usize| ([out, inp], 1.0 / (inp as f32).sqrt());
    let (d, q, kv, h, v) = (
        c.d_model,
        c.n_heads * c.d_head,
        c.n_kv_heads * c.d_head,
        c.d_mlp,
        c.vocab_size,
    );
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "model.embed_tokens.weight".to_string(),
        draw(&[v, d], 0.0, 1.0)?,
    );
    tensors.insert("model.norm.weight".to_string(), draw(&[d], 1.0, 0.1)?);
    tensors.insert(
        "lm_head.weight".to_string(),
        draw(&[v, d], 0.0, 1.0 / (d as f32).sqrt())?,
    );
    for layer in 0..c.n_layers {
        let p = format!("model.layers.{layer}");
        for (name, (shape, std)) in [
            ("self_attn.q_proj.weight", linear(q, d)),
            ("self_attn.k_proj.weight", linear(kv, d)),
            ("self_attn.v_proj.weight", linear(kv, d)),
            ("self_attn.o_proj.weight", linear(d, q)),
            ("mlp.gate_proj.weight", linear(h, d)),
            ("mlp.up_proj.weight", linear(h, d)),
            ("mlp.down_proj.weight", linear(d, h)),
        ] {
            tensors.insert(format!("{p}.{name}"), draw(&shape, 0.0, std)?);
        }
        if c.attention_bias {
            for (name, width) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                tensors.insert(
                    format!("{p}.self_attn.{name}.bias"),
                    draw(&[width], 0.0, 0.1)?,
                );
            }
        }
        for norm in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            tensors.insert(format!("{p}.{norm}"), draw(&[d], 1.0, 0.1)?);
        }
    }
    Ok(TensorMap::new("<tiny random model>", tensors))
}

/// GPT-2's printable stand-in for byte `b` in byte-level BPE vocabularies.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap_or('?')
}

/// Byte-level BPE with no merges: token id = byte value.
fn byte_tokenizer() -> Result<Tokenizer> {
    let tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    Tokenizer::byte_level_bpe(&tokens, &[], &[], "gpt2")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_maps_bytes_to_their_values() {
        let tok = byte_tokenizer().unwrap();
        let text = "Hi there, ünïcode!";
        let ids = tok.encode(text).unwrap();
        let expected: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, expected);
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }

    #[test]
    fn same_seed_same_weights() {
        let a = tiny_checkpoint(7).unwrap();
        let b = tiny_checkpoint(7).unwrap();
        let name = "model.layers.2.mlp.up_proj.weight";
        let diff = (a.weights.tensor(name).unwrap() - b.weights.tensor(name).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }
}
