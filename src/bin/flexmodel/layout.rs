//! The `[--tp N] [--pp N] [--dp N]` options every command takes.

use anyhow::bail;
use clap::Args;

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
    /// Fails unless the layout is one shard: sharded execution is not built yet.
    pub fn require_single_shard(&self) -> anyhow::Result<()> {
        if (self.tp, self.pp, self.dp) != (1, 1, 1) {
            bail!(
                "layout tp={} pp={} dp={} is not supported yet: this build runs one shard (tp=pp=dp=1)",
                self.tp,
                self.pp,
                self.dp
            );
        }
        Ok(())
    }
}
