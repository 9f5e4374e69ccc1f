//! The logit lens and the tuned lens (Belrose et al., 2023, "Eliciting Latent Predictions
//! from Transformers with the Tuned Lens"): read a prediction off the residual stream of
//! an intermediate layer by decoding it with the model's own final norm and unembedding.
//!
//! The logit lens decodes `blocks.i.hook_resid_pre` as it is. The tuned lens first passes
//! it through a per-layer affine translator in residual form, `h + A·h + b` (`A` and `b`
//! start at zero, so training starts from the logit lens), trained to minimise
//! KL(final ‖ lens): the divergence of the lens's next-token distribution from the
//! model's. The residual streams come from the (possibly sharded) model through the hook
//! API; the translators live in the driver.

use std::collections::HashMap;
use std::f64::consts::LN_2;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use candle_nn::optim::{AdamW, ParamsAdamW};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::models::RmsNorm;
use crate::weights::write_safetensors;
use crate::{Error, FlexModel, Result};

/// The model's decoder of the residual stream: final RMSNorm, then the LM head.
#[derive(Debug, Clone)]
pub struct Unembed {
    norm: RmsNorm,
    /// The LM head, transposed: `[d_model, vocab]`.
    head_t: Tensor,
}

impl Unembed {
    /// The final norm and LM head of `model`, joined from its shards.
    pub fn of(model: &FlexModel) -> Result<Self> {
        let config = model.config();
        let norm_weight = model.parameter("model.norm.weight")?.detach();
        Ok(Self {
            norm: config.final_norm(norm_weight),
            head_t: model
                .parameter(config.lm_head())?
                .detach()
                .t()?
                .contiguous()?,
        })
    }

    /// Logits `[n, vocab]` of residual streams `h` (`[n, d_model]`).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(h)?.matmul(&self.head_t)?)
    }

    /// The mean over rows of KL(p ‖ lens(h)) in bits, and its gradient with respect to
    /// every variable `h` depends on. `target_log_probs` holds log p (`[n, vocab]`).
    ///
    /// The gradient with respect to the logits is `(q − p) / (n ln 2)`; it is taken
    /// through the (frozen) LM head by hand, which saves autograd the LM head's own
    /// gradient, a matmul as large as the forward one.
    pub fn kl_gradient(
        &self,
        h: &Tensor,
        target_log_probs: &Tensor,
    ) -> Result<(f32, candle_core::backprop::GradStore)> {
        let n = h.dim(0)? as f64;
        let normalized = self.norm.forward(h)?;
        let logits = normalized.detach().matmul(&self.head_t)?;
        let log_q = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let p = target_log_probs.exp()?;
        let kl = ((&p * (target_log_probs - &log_q)?)?.sum_all()? / (n * LN_2))?;
        let grad_logits = ((log_q.exp()? - p)? / (n * LN_2))?;
        let grad_normalized = grad_logits.matmul(&self.head_t.t()?)?;
        let surrogate = (normalized * grad_normalized)?.sum_all()?;
        Ok((kl.to_scalar::<f32>()?, surrogate.backward()?))
    }
}

/// KL(p ‖ q) in bits for each row, where `target_log_probs` holds log p and `logits`
/// the (unnormalised) log q: `[n, vocab]` → `[n]`.
pub fn kl_bits(target_log_probs: &Tensor, logits: &Tensor) -> Result<Tensor> {
    let log_q = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let p = target_log_probs.exp()?;
    let kl = (p * (target_log_probs - log_q)?)?.sum(D::Minus1)?;
    Ok((kl / LN_2)?)
}

/// The residual stream entering every layer and the model's own next-token
/// log-probabilities, for the tokens of one batch (rows are `b·t` token positions).
#[derive(Debug, Clone)]
pub struct Residuals {
    /// `blocks.i.hook_resid_pre` for every layer `i`, each `[b·t, d_model]`.
    pub layers: Vec<Tensor>,
    /// log-softmax of the final logits, `[b·t, vocab]`.
    pub final_log_probs: Tensor,
}

/// Runs `model` on `tokens` (`[b, t]`) and collects [`Residuals`] through the hook API.
pub fn residuals(model: &mut FlexModel, tokens: &Tensor) -> Result<Residuals> {
    let (logits, resid) = super::capture_every_layer(model, tokens, "hook_resid_pre")?;
    let (b, t, vocab) = logits.dims3()?;
    let layers = resid
        .iter()
        .map(|h| Ok(h.reshape((b * t, ()))?.to_dtype(DType::F32)?))
        .collect::<Result<Vec<_>>>()?;
    let logits = logits.reshape((b * t, vocab))?.to_dtype(DType::F32)?;
    Ok(Residuals {
        layers,
        final_log_probs: candle_nn::ops::log_softmax(&logits, D::Minus1)?.detach(),
    })
}

/// How the tuned lens is trained.
#[derive(Debug, Clone, Copy)]
pub struct Training {
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// Passes over the training batches.
    pub epochs: usize,
}

impl Default for Training {
    fn default() -> Self {
        Self {
            learning_rate: 1e-3,
            epochs: 1,
        }
    }
}

/// One affine translator per layer, `h ↦ h + h·Aᵀ + b`.
#[derive(Debug)]
pub struct TunedLens {
    weights: Vec<Var>,
    biases: Vec<Var>,
}

impl TunedLens {
    /// Identity translators (`A = 0`, `b = 0`): the logit lens.
    pub fn identity(n_layers: usize, d_model: usize) -> Result<Self> {
        // Trained on the host, on captured (host) residuals.
        let device = Device::Cpu;
        Ok(Self {
            weights: (0..n_layers)
                .map(|_| Var::zeros((d_model, d_model), DType::F32, &device))
                .collect::<candle_core::Result<_>>()?,
            biases: (0..n_layers)
                .map(|_| Var::zeros(d_model, DType::F32, &device))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// The number of layers it has translators for.
    pub fn n_layers(&self) -> usize {
        self.weights.len()
    }

    /// The residual stream of `layer` (`[n, d_model]`) mapped by that layer's translator.
    pub fn translate(&self, layer: usize, h: &Tensor) -> Result<Tensor> {
        let (weight, bias) = self.translator(layer)?;
        Ok((h + h.matmul(&weight.t()?)?.broadcast_add(bias)?)?)
    }

    fn translator(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        match (self.weights.get(layer), self.biases.get(layer)) {
            (Some(w), Some(b)) => Ok((w.as_tensor(), b.as_tensor())),
            _ => Err(Error::InvalidArgument {
                argument: "layer",
                problem: format!(
                    "the tuned lens has {} layers, layer {layer} was asked for",
                    self.n_layers()
                ),
            }),
        }
    }

    /// Writes the translators to a safetensors file (`translators.{i}.weight` `[d, d]`,
    /// `translators.{i}.bias` `[d]`), through a temporary file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for (i, (w, b)) in self.weights.iter().zip(&self.biases).enumerate() {
            tensors.insert(format!("translators.{i}.weight"), w.as_tensor().clone());
            tensors.insert(format!("translators.{i}.bias"), b.as_tensor().clone());
        }
        write_safetensors(&tensors, path)
    }

    /// Reads translators written by [`TunedLens::save`], checking that there is one per
    /// layer of a model with `n_layers` layers and width `d_model`.
    pub fn load(path: &Path, n_layers: usize, d_model: usize) -> Result<Self> {
        let bad = |message: String| Error::BadWeightsFile {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        // The lens is trained and applied on the host, where the captures are.
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let mut take = |name: String, shape: &[usize]| -> Result<Var> {
            let tensor = tensors
                .remove(&name)
                .ok_or_else(|| bad(format!("no tensor {name} (is it a tuned lens?)")))?;
            if tensor.dims() != shape {
                return Err(bad(format!(
                    "{name} has shape {:?}, this model needs {shape:?}",
                    tensor.dims()
                )));
            }
            Ok(Var::from_tensor(&tensor.to_dtype(DType::F32)?)?)
        };
        let mut lens = Self {
            weights: Vec::with_capacity(n_layers),
            biases: Vec::with_capacity(n_layers),
        };
        for i in 0..n_layers {
            lens.weights.push(take(
                format!("translators.{i}.weight"),
                &[d_model, d_model],
            )?);
            lens.biases
                .push(take(format!("translators.{i}.bias"), &[d_model])?);
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(bad(format!(
                "unexpected tensor {extra}: the lens has more layers than the model ({n_layers})"
            )));
        }
        Ok(lens)
    }

    /// Trains every translator on `batches` of token ids (`[b, t]` each) to minimise the
    /// mean KL(final ‖ lens) over tokens. One Adam step per layer and batch; `progress`
    /// advances once per batch and shows the mean KL (bits) over layers. Returns that
    /// mean after each step.
    pub fn train(
        &mut self,
        model: &mut FlexModel,
        unembed: &Unembed,
        batches: &[Tensor],
        training: Training,
        progress: &ProgressBar,
    ) -> Result<Vec<f32>> {
        let params = ParamsAdamW {
            lr: training.learning_rate,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        };
        let mut optimizers = self
            .weights
            .iter()
            .zip(&self.biases)
            .map(|(w, b)| AdamW::new(vec![w.clone(), b.clone()], params.clone()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut curve = Vec::with_capacity(batches.len() * training.epochs);
        for _ in 0..training.epochs {
            for tokens in batches {
                let residuals = residuals(model, tokens)?;
                self.check_layers(&residuals)?;
                let mut total = 0.0;
                for (layer, optimizer) in optimizers.iter_mut().enumerate() {
                    let lens = self.translate(layer, &residuals.layers[layer])?;
                    let (kl, grads) = unembed.kl_gradient(&lens, &residuals.final_log_probs)?;
                    optimizer.step(&grads)?;
                    total += kl;
                }
                let mean = total / self.n_layers() as f32;
                curve.push(mean);
                progress.set_message(format!("mean KL {mean:.3} bits"));
                progress.inc(1);
            }
        }
        Ok(curve)
    }

    fn check_layers(&self, residuals: &Residuals) -> Result<()> {
        match residuals.layers.len() == self.n_layers() {
            true => Ok(()),
            false => Err(Error::Analysis {
                analysis: "tuned lens",
                problem: format!(
                    "the lens has {} layers, the model {}",
                    self.n_layers(),
                    residuals.layers.len()
                ),
            }),
        }
    }

    /// The mean KL(final ‖ lens) in bits over every token of `batches`, per layer, for
    /// the logit lens and this tuned lens; `progress` advances once per batch.
    pub fn evaluate(
        &self,
        model: &mut FlexModel,
        unembed: &Unembed,
        batches: &[Tensor],
        progress: &ProgressBar,
    ) -> Result<LensReport> {
        let n_layers = self.n_layers();
        let (mut logit_sum, mut tuned_sum) = (vec![0f64; n_layers], vec![0f64; n_layers]);
        let mut tokens = 0usize;
        for batch in batches {
            let residuals = residuals(model, batch)?;
            self.check_layers(&residuals)?;
            let target = &residuals.final_log_probs;
            for (layer, h) in residuals.layers.iter().enumerate() {
                let sum = |logits: Tensor| -> Result<f64> {
                    Ok(kl_bits(target, &logits)?
                        .to_dtype(DType::F64)?
                        .sum_all()?
                        .to_scalar::<f64>()?)
                };
                logit_sum[layer] += sum(unembed.logits(h)?)?;
                tuned_sum[layer] += sum(unembed.logits(&self.translate(layer, h)?.detach())?)?;
            }
            tokens += target.dim(0)?;
            progress.inc(1);
        }
        if tokens == 0 {
            return Err(Error::NoTokens {
                what: "the evaluation text",
            });
        }
        let layers = (0..n_layers)
            .map(|layer| LayerKl {
                layer,
                logit_kl_bits: logit_sum[layer] / tokens as f64,
                tuned_kl_bits: tuned_sum[layer] / tokens as f64,
            })
            .collect();
        Ok(LensReport { layers, tokens })
    }
}

/// The KL of both lenses at one layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerKl {
    /// The layer whose `hook_resid_pre` is decoded.
    pub layer: usize,
    /// Mean KL(final ‖ logit lens) in bits.
    pub logit_kl_bits: f64,
    /// Mean KL(final ‖ tuned lens) in bits.
    pub tuned_kl_bits: f64,
}

/// Both lenses at every layer, averaged over `tokens` evaluation tokens
/// (`lens_report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LensReport {
    /// One entry per layer, in order.
    pub layers: Vec<LayerKl>,
    /// How many token positions were averaged over.
    pub tokens: usize,
}

impl LensReport {
    /// Writes the report as JSON to `path`.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        // Numbers and strings only: serializing cannot fail.
        let json = serde_json::to_string_pretty(self)
            .map_err(|_| Error::Internal("the lens report does not serialize"))?;
        std::fs::write(path, json + "\n").map_err(|e| Error::io(path, e))
    }

    /// Plots the KL of both lenses against the layer into the PNG file `path`.
    #[cfg(feature = "plot")]
    pub fn save_plot(&self, path: &Path) -> Result<()> {
        use crate::plot::{Line, LineChart};
        let line = |label: &str, kl: fn(&LayerKl) -> f64| Line {
            label: label.to_string(),
            points: self
                .layers
                .iter()
                .map(|l| (l.layer as f32, kl(l) as f32))
                .collect(),
        };
        let title = format!("Logit lens vs tuned lens ({} held-out tokens)", self.tokens);
        LineChart {
            title: &title,
            x_label: "layer (decoding blocks.i.hook_resid_pre)",
            y_label: "KL(final ‖ lens), bits (log scale)",
            lines: &[
                line("logit lens", |l| l.logit_kl_bits),
                line("tuned lens", |l| l.tuned_kl_bits),
            ],
            log_y: true,
        }
        .save(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_a_distribution_with_itself_is_zero_and_positive_otherwise() {
        let logits = Tensor::randn(0f32, 3.0, (4, 50), &Device::Cpu).unwrap();
        let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let same = kl_bits(&log_p, &(&logits + 7.0).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(same.iter().all(|kl| kl.abs() < 1e-5), "{same:?}");
        let other = Tensor::randn(0f32, 3.0, (4, 50), &Device::Cpu).unwrap();
        let kl = kl_bits(&log_p, &other).unwrap().to_vec1::<f32>().unwrap();
        assert!(kl.iter().all(|kl| *kl > 0.0), "{kl:?}");
    }

    #[test]
    fn kl_in_bits_matches_the_definition() {
        let p = [0.5f32, 0.25, 0.25];
        let q = [0.25f32, 0.25, 0.5];
        let expected: f32 = p.iter().zip(&q).map(|(p, q)| p * (p / q).log2()).sum();
        let log_p = Tensor::new(&[p.map(f32::ln)], &Device::Cpu).unwrap();
        let log_q = Tensor::new(&[q.map(f32::ln)], &Device::Cpu).unwrap();
        let kl = kl_bits(&log_p, &log_q).unwrap().to_vec1::<f32>().unwrap();
        assert!((kl[0] - expected).abs() < 1e-6, "{} vs {expected}", kl[0]);
    }

    #[test]
    fn kl_gradient_equals_autograd_through_the_whole_lens() {
        let device = Device::Cpu;
        let norm_weight = Tensor::randn(1f32, 0.2, 6, &device).unwrap();
        let unembed = Unembed {
            norm: RmsNorm::new("norm", norm_weight, 1e-5),
            head_t: Tensor::randn(0f32, 1.0, (6, 11), &device).unwrap(),
        };
        let target = candle_nn::ops::log_softmax(
            &Tensor::randn(0f32, 2.0, (5, 11), &device).unwrap(),
            D::Minus1,
        )
        .unwrap();
        let h = Var::from_tensor(&Tensor::randn(0f32, 3.0, (5, 6), &device).unwrap()).unwrap();
        let (kl, grads) = unembed.kl_gradient(h.as_tensor(), &target).unwrap();
        let auto = kl_bits(&target, &unembed.logits(h.as_tensor()).unwrap())
            .unwrap()
            .mean_all()
            .unwrap();
        assert!((kl - auto.to_scalar::<f32>().unwrap()).abs() < 1e-5);
        let expected = auto.backward().unwrap();
        let (a, b) = (grads.get(&h).unwrap(), expected.get(&h).unwrap());
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        let (diff, scale) = (
            diff.to_scalar::<f32>().unwrap(),
            scale.to_scalar::<f32>().unwrap(),
        );
        assert!(diff < 1e-5 * scale.max(1.0), "{diff} (scale {scale})");
    }

    #[test]
    fn identity_translators_leave_the_residual_stream_unchanged() {
        let lens = TunedLens::identity(2, 8).unwrap();
        let h = Tensor::randn(0f32, 1.0, (3, 8), &Device::Cpu).unwrap();
        let out = lens.translate(1, &h).unwrap();
        let diff = (out - &h).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert!(lens.translate(2, &h).is_err());
    }

    #[test]
    fn saved_translators_load_back_and_wrong_shapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lens.safetensors");
        let lens = TunedLens::identity(3, 4).unwrap();
        lens.weights[1]
            .set(&Tensor::randn(0f32, 1.0, (4, 4), &Device::Cpu).unwrap())
            .unwrap();
        lens.save(&path).unwrap();
        let loaded = TunedLens::load(&path, 3, 4).unwrap();
        let h = Tensor::randn(0f32, 1.0, (2, 4), &Device::Cpu).unwrap();
        let (a, b) = (
            lens.translate(1, &h).unwrap(),
            loaded.translate(1, &h).unwrap(),
        );
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let wrong_width = TunedLens::load(&path, 3, 5).unwrap_err().to_string();
        assert!(
            wrong_width.contains("translators.0.weight has shape [4, 4]"),
            "{wrong_width}"
        );
        let fewer_layers = TunedLens::load(&path, 2, 4).unwrap_err().to_string();
        assert!(fewer_layers.contains("more layers"), "{fewer_layers}");
        let more_layers = TunedLens::load(&path, 4, 4).unwrap_err().to_string();
        assert!(
            more_layers.contains("no tensor translators.3.weight"),
            "{more_layers}"
        );
    }
}
