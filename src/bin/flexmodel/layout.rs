//! The `[--tp N] [--pp N] [--dp N]` options every command takes.

use clap::Args;
use flexmodel::{Checkpoint, FlexModel};
use flexmodel_cluster::Layout;

/// How the model is split: tensor × pipeline × data parallel.
#[derive(Args, Debug, Clone, Copy)]
pub struct LayoutArgs {
    /// Tensor-parallel ranks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub tp: u32,
    /// Pipeline-parallel stages.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub pp: u32,
    /// Data-parallel replicas.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub dp: u32,
}

impl LayoutArgs {
    /// The layout these options describe.
    pub fn layout(&self) -> anyhow::Result<Layout> {
        Ok(Layout::new(
            self.dp as usize,
            self.pp as usize,
            self.tp as usize,
        )?)
    }

    /// The model of `checkpoint` split over this layout.
    pub fn build(&self, checkpoint: &Checkpoint) -> anyhow::Result<FlexModel> {
        Ok(FlexModel::build(checkpoint, self.layout()?)?)
    }
}
