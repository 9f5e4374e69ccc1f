//! Ready-made edits, and the `NAME=ACTION:ARG` edit specs of the command line.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::hooks::function::HookCtx;
use crate::{Error, HookFunction, Result};

/// An edit that zeroes head `head` of a head-indexed hook point.
pub fn zero_head(
    head: usize,
) -> impl FnMut(&mut HookCtx<'_>, Tensor) -> Result<Tensor> + Send + 'static {
    move |ctx, x| {
        let dim = ctx
            .point()
            .head_dim()
            .ok_or_else(|| Error::NoHeadDimension {
                hook: ctx.name().to_string(),
            })?;
        let heads = x.dim(dim)?;
        if head >= heads {
            return Err(Error::NoSuchHead {
                hook: ctx.name().to_string(),
                head,
                heads,
            });
        }
        let mask: Vec<f32> = (0..heads)
            .map(|h| if h == head { 0.0 } else { 1.0 })
            .collect();
        let mut shape = vec![1; x.rank()];
        shape[dim] = heads;
        let mask = Tensor::from_vec(mask, shape, x.device())?.to_dtype(x.dtype())?;
        Ok(x.broadcast_mul(&mask)?)
    }
}

/// An edit that multiplies the value by `factor`.
pub fn scale(
    factor: f64,
) -> impl FnMut(&mut HookCtx<'_>, Tensor) -> Result<Tensor> + Send + 'static {
    move |_, x| Ok((x * factor)?)
}

/// An edit that adds `delta`, broadcast to the value's shape (copied to the value's
/// device on first use).
pub fn add(
    mut delta: Tensor,
) -> impl FnMut(&mut HookCtx<'_>, Tensor) -> Result<Tensor> + Send + 'static {
    move |ctx, x| {
        if !delta.device().same_device(x.device()) {
            delta = delta.to_device(x.device())?;
        }
        let delta = delta.to_dtype(x.dtype())?;
        x.broadcast_add(&delta)
            .map_err(|_| Error::DoesNotBroadcast {
                hook: ctx.name().to_string(),
                delta: delta.dims().to_vec(),
                value: x.dims().to_vec(),
            })
    }
}

/// An edit that sets latent `latent` of an SAE's latents (`HOOK.hook_sae_acts_post`,
/// `…_pre`) to `value` at every position: `0` turns it off, as SAELens's feature
/// ablation does; a large value steers.
pub fn clamp_latent(
    latent: usize,
    value: f64,
) -> impl FnMut(&mut HookCtx<'_>, Tensor) -> Result<Tensor> + Send + 'static {
    let edit = if value == 0.0 {
        "zero-latent"
    } else {
        "clamp-latent"
    };
    move |ctx, x| {
        if ctx.point().shape_spec().last() != Some(&crate::hooks::Size::Latents) {
            return Err(Error::NoLatentDimension {
                edit,
                hook: ctx.name().to_string(),
            });
        }
        let latents = x.dim(candle_core::D::Minus1)?;
        if latent >= latents {
            return Err(Error::NoSuchLatent {
                edit,
                hook: ctx.name().to_string(),
                latent,
                latents,
            });
        }
        let mut shape = vec![1; x.rank()];
        shape[x.rank() - 1] = latents;
        let one_hot: Vec<f32> = (0..latents).map(|i| f32::from(i == latent)).collect();
        let one_hot = Tensor::from_vec(one_hot, shape, x.device())?.to_dtype(x.dtype())?;
        let kept = x.broadcast_mul(&(1.0 - &one_hot)?)?;
        Ok(kept.broadcast_add(&(one_hot * value)?)?)
    }
}

/// One `--edit` of the command line: `NAME=zero-head:H`, `NAME=scale:F`,
/// `NAME=add:FILE.safetensors` (the tensor under key `NAME`), and on an SAE's latents
/// `NAME=zero-latent:K` or `NAME=clamp-latent:K:V`.
#[derive(Debug, Clone)]
pub struct EditSpec {
    /// The hook point (or pattern) to edit.
    pub target: String,
    /// What to do to it.
    pub action: EditAction,
}

/// The action of an [`EditSpec`].
#[derive(Debug, Clone)]
pub enum EditAction {
    /// Zero one head.
    ZeroHead(usize),
    /// Multiply by a factor.
    Scale(f64),
    /// Add a tensor (broadcast).
    Add(Tensor),
    /// Set one latent of an SAE to a value at every position (`zero-latent:K` sets it
    /// to 0).
    ClampLatent {
        /// The latent.
        latent: usize,
        /// Its value.
        value: f64,
    },
}

impl EditSpec {
    /// Parses `spec`, reading the tensor of an `add:` from its file.
    pub fn parse(spec: &str) -> Result<Self> {
        Self::parse_with(spec, &std::collections::BTreeMap::new())
    }

    /// Parses `spec`, whose `add:@KEY` takes the tensor `KEY` of `inline` (the tensors a
    /// request sent along), and whose `add:FILE` reads the file.
    pub fn parse_with(
        spec: &str,
        inline: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        let bad = |why: &str| Error::MalformedEdit {
            spec: spec.to_string(),
            problem: why.to_string(),
        };
        let (target, action) = spec
            .split_once('=')
            .ok_or_else(|| {
                bad("expected NAME=zero-head:H, NAME=scale:F, NAME=add:FILE, NAME=zero-latent:K or NAME=clamp-latent:K:V")
            })?;
        let (kind, arg) = action
            .split_once(':')
            .ok_or_else(|| bad("expected ACTION:ARGUMENT after '='"))?;
        if target.is_empty() {
            return Err(bad("no hook name before '='"));
        }
        let action = match kind {
            "zero-head" => EditAction::ZeroHead(
                arg.parse()
                    .map_err(|_| bad("the head must be a non-negative integer"))?,
            ),
            "scale" => {
                let factor: f64 = arg
                    .parse()
                    .map_err(|_| bad("the factor must be a number"))?;
                if !factor.is_finite() {
                    return Err(bad("the factor must be finite"));
                }
                EditAction::Scale(factor)
            }
            "add" => match arg.strip_prefix('@') {
                Some(key) => EditAction::Add(
                    inline
                        .get(key)
                        .ok_or_else(|| bad(&format!("no tensor {key:?} was sent with the edits")))?
                        .to_dtype(DType::F32)?,
                ),
                None => EditAction::Add(read_tensor(Path::new(arg), target)?),
            },
            "zero-latent" => EditAction::ClampLatent {
                latent: arg
                    .parse()
                    .map_err(|_| bad("the latent must be a non-negative integer"))?,
                value: 0.0,
            },
            "clamp-latent" => {
                let (latent, value) = arg
                    .split_once(':')
                    .ok_or_else(|| bad("expected clamp-latent:K:VALUE"))?;
                let latent = latent
                    .parse()
                    .map_err(|_| bad("the latent must be a non-negative integer"))?;
                let value: f64 = value
                    .parse()
                    .map_err(|_| bad("the value must be a number"))?;
                if !value.is_finite() {
                    return Err(bad("the value must be finite"));
                }
                EditAction::ClampLatent { latent, value }
            }
            other => {
                return Err(bad(&format!(
                    "unknown action {other:?} (zero-head, scale, add, zero-latent or clamp-latent)"
                )));
            }
        };
        Ok(Self {
            target: target.to_string(),
            action,
        })
    }

    /// What this edit does, as text equal for equal edits: `NAME=zero-head:H`,
    /// `NAME=scale:F`, or `NAME=add:` and the SHA-256 of the added tensor (its shape and
    /// values, wherever its file lies).
    pub fn fingerprint(&self) -> Result<String> {
        let target = &self.target;
        Ok(match &self.action {
            EditAction::ZeroHead(h) => format!("{target}=zero-head:{h}"),
            EditAction::Scale(f) => format!("{target}=scale:{f}"),
            EditAction::ClampLatent { latent, value } => {
                format!("{target}=clamp-latent:{latent}:{value}")
            }
            EditAction::Add(t) => format!(
                "{target}=add:sha256:{}",
                crate::weights::fingerprint::of_tensors([("delta", t)])?
            ),
        })
    }

    /// The hook function that performs this edit (without capturing).
    pub fn hook_function(&self) -> HookFunction {
        let hook = HookFunction::new(self.target.clone()).without_capture();
        match &self.action {
            EditAction::ZeroHead(h) => hook.with_edit(zero_head(*h)),
            EditAction::Scale(f) => hook.with_edit(scale(*f)),
            EditAction::Add(t) => hook.with_edit(add(t.clone())),
            EditAction::ClampLatent { latent, value } => {
                hook.with_edit(clamp_latent(*latent, *value))
            }
        }
    }
}

/// The tensor under `key` in the safetensors file `path`, as f32.
fn read_tensor(path: &Path, key: &str) -> Result<Tensor> {
    let bad = |message: String| Error::BadWeightsFile {
        path: path.to_path_buf(),
        message,
    };
    // Read on the host; `add` copies it to the value's device on first use.
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| bad(format!("cannot read: {}", crate::error::tensor_message(&e))))?;
    let t = tensors
        .get(key)
        .ok_or_else(|| bad(format!("has no tensor under the key {key:?}")))?;
    Ok(t.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let spec = EditSpec::parse("blocks.1.attn.hook_z=zero-head:3").unwrap();
        assert_eq!(spec.target, "blocks.1.attn.hook_z");
        assert!(matches!(spec.action, EditAction::ZeroHead(3)));
        assert!(
            matches!(EditSpec::parse("x=scale:0.5").unwrap().action, EditAction::Scale(f) if f == 0.5)
        );
        let clamp = EditSpec::parse("a.hook_sae_acts_post=clamp-latent:7:-2.5").unwrap();
        assert!(matches!(
            clamp.action,
            EditAction::ClampLatent { latent: 7, value } if value == -2.5
        ));
        let zero = EditSpec::parse("a.hook_sae_acts_post=zero-latent:7").unwrap();
        assert!(matches!(
            zero.action,
            EditAction::ClampLatent { latent: 7, value } if value == 0.0
        ));
    }

    #[test]
    fn malformed_specs_say_what_is_wrong() {
        for (spec, why) in [
            ("blocks.1.attn.hook_z", "expected NAME="),
            ("x=zero-head", "expected ACTION:ARGUMENT"),
            ("x=zero-head:-1", "non-negative integer"),
            ("x=scale:abc", "must be a number"),
            ("x=scale:inf", "finite"),
            ("x=shift:1", "unknown action \"shift\""),
            ("=scale:2", "no hook name"),
            ("x=zero-latent:k", "non-negative integer"),
            ("x=clamp-latent:3", "clamp-latent:K:VALUE"),
            ("x=clamp-latent:3:nan", "finite"),
        ] {
            let err = EditSpec::parse(spec).unwrap_err().to_string();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn an_added_tensor_is_fingerprinted_by_its_values_not_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, values: &[f32]| {
            let path = dir.path().join(name);
            let t = Tensor::new(values, &Device::Cpu).unwrap();
            crate::weights::write_safetensors(&[("x".to_string(), t)].into(), &path).unwrap();
            EditSpec::parse(&format!("x=add:{}", path.display())).unwrap()
        };
        let (a, b, c) = (
            write("a", &[1.0, 2.0]),
            write("b", &[1.0, 2.0]),
            write("c", &[1.0, 3.0]),
        );
        assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
        assert_ne!(a.fingerprint().unwrap(), c.fingerprint().unwrap());
        let scale = EditSpec::parse("x=scale:0.5").unwrap();
        assert_eq!(scale.fingerprint().unwrap(), "x=scale:0.5");
    }

    #[test]
    fn add_from_a_missing_file_names_it() {
        let err = EditSpec::parse("x=add:/no/such.safetensors")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/no/such.safetensors"), "{err}");
    }
}
