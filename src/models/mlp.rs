//! The gated MLP (SwiGLU, GeGLU) over this rank's slice of the hidden layer.

use candle_core::Tensor;
use std::sync::Arc;

use flexmodel_cluster::{Collective, TpRank, conjugate};

use crate::hooks::{BlockSite, HookPoint};
use crate::models::{ColumnParallelLinear, RowParallelLinear};
use crate::weights::HeldWeights;
use crate::{HookLayer, Result};

/// The activation of a gated MLP's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(x) = x·σ(x)` (LLaMA's SwiGLU).
    SiLU,
    /// GELU in its tanh approximation, `½x(1 + tanh(√(2/π)(x + 0.044715x³)))` (Gemma's
    /// GeGLU, PyTorch's `gelu(approximate="tanh")`).
    GeluTanh,
}

/// `down(act(gate(x)) · up(x))`, holding hidden units of one tensor-parallel rank.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: ColumnParallelLinear,
    up_proj: ColumnParallelLinear,
    down_proj: RowParallelLinear,
    activation: Activation,
}

impl Mlp {
    /// Loads the hidden units of `tp` from `{prefix}.mlp.*`, of a model of width `d`
    /// with `h` hidden units.
    pub fn load(
        weights: &HeldWeights<'_>,
        prefix: &str,
        [d, h]: [usize; 2],
        tp: TpRank,
        activation: Activation,
    ) -> Result<Self> {
        let units = tp.slice_of("intermediate_size", h)?;
        let p = format!("{prefix}.mlp");
        Ok(Self {
            gate_proj: ColumnParallelLinear::load(
                weights,
                &format!("{p}.gate_proj"),
                [h, d],
                units.clone(),
                false,
            )?,
            up_proj: ColumnParallelLinear::load(
                weights,
                &format!("{p}.up_proj"),
                [h, d],
                units.clone(),
                false,
            )?,
            down_proj: RowParallelLinear::load(weights, &format!("{p}.down_proj"), [d, h], units)?,
            activation,
        })
    }

    /// Every parameter slice this rank holds.
    pub fn parameters(&self) -> Vec<flexmodel_cluster::ParamSlice> {
        let mut all = self.gate_proj.parameters();
        all.extend(self.up_proj.parameters());
        all.extend(self.down_proj.parameters());
        all
    }

    /// The same MLP with `f` of each of its tensors.
    pub fn map_parameters(&self, f: &mut crate::models::parallel::ParamMap<'_>) -> Result<Self> {
        Ok(Self {
            gate_proj: self.gate_proj.map_parameters(f)?,
            up_proj: self.up_proj.map_parameters(f)?,
            down_proj: self.down_proj.map_parameters(f)?,
            activation: self.activation,
        })
    }

    /// The MLP of `x` (the normed residual), summed over all ranks (before
    /// `hook_mlp_out`, which the block hooks: Gemma norms it first).
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        hooks: &mut dyn HookLayer,
        collective: &Arc<dyn Collective>,
    ) -> Result<Tensor> {
        let x = &conjugate::copy_to_group(x, collective)?;
        let mut hook = |site, value| hooks.hook(HookPoint::Block { layer, site }, value);
        let gate = hook(BlockSite::MLP_PRE, self.gate_proj.forward(x)?)?;
        let up = hook(BlockSite::MLP_PRE_LINEAR, self.up_proj.forward(x)?)?;
        let post = hook(BlockSite::MLP_POST, gated(self.activation, &gate, &up)?)?;
        self.down_proj.forward(&post, collective.as_ref())
    }
}

/// `act(gate) · up`.
fn gated(activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let _op = crate::op_span!("activation");
    Ok(match activation {
        Activation::SiLU => flexmodel_kernels::swiglu(gate, up)?,
        Activation::GeluTanh => (gate.gelu()? * up)?,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn geglu_is_the_tanh_gelu_of_the_gate_times_up() {
        let gate = [-3.0f32, -0.5, 0.0, 0.7, 2.5];
        let up = [1.5f32, -2.0, 3.0, 0.25, -1.0];
        let tensor = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let out = gated(Activation::GeluTanh, &tensor(&gate), &tensor(&up)).unwrap();
        let out = out.to_vec1::<f32>().unwrap();
        for ((g, u), o) in gate.iter().zip(up).zip(out) {
            let g = *g as f64;
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let gelu = 0.5 * g * (1.0 + (c * (g + 0.044715 * g.powi(3))).tanh());
            let expected = gelu * u as f64;
            assert!((o as f64 - expected).abs() < 1e-6, "{o} vs {expected}");
        }
    }
}
