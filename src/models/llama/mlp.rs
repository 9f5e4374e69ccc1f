//! The SwiGLU MLP over this rank's slice of the hidden layer.

use candle_core::Tensor;
use std::sync::Arc;

use flexmodel_cluster::{Collective, TpRank, conjugate};

use super::LlamaConfig;
use crate::hooks::{BlockSite, HookPoint};
use crate::models::{ColumnParallelLinear, RowParallelLinear};
use crate::weights::HeldWeights;
use crate::{HookLayer, Result};

/// `down(silu(gate(x)) · up(x))`, holding hidden units of one tensor-parallel rank.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: ColumnParallelLinear,
    up_proj: ColumnParallelLinear,
    down_proj: RowParallelLinear,
}

impl Mlp {
    /// Loads the hidden units of `tp` from `{prefix}.mlp.*`.
    pub fn load(
        weights: &HeldWeights<'_>,
        prefix: &str,
        config: &LlamaConfig,
        tp: TpRank,
    ) -> Result<Self> {
        let (d, h) = (config.d_model, config.d_mlp);
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
        })
    }

    /// The MLP of `x` (the normed residual), summed over all ranks.
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
        let post = hook(BlockSite::MLP_POST, swiglu(&gate, &up)?)?;
        hook(
            BlockSite::MLP_OUT,
            self.down_proj.forward(&post, collective.as_ref())?,
        )
    }
}

/// `silu(gate) · up`.
fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let _op = crate::op_span!("activation");
    Ok(flexmodel_kernels::swiglu(gate, up)?)
}
