//! The `[--stop-at-layer N] [--logits all|last|none]` options of the commands that run
//! forward passes (`capture`, `bench`, `cache`).

use clap::{Args, ValueEnum};
use flexmodel::{Logits, PassScope};

/// How much of the model each pass runs and which logits it gathers.
#[derive(Args, Debug, Clone)]
pub struct PassArgs {
    /// Run blocks 0..N only (TransformerLens's `stop_at_layer`): hook points after block
    /// N−1 do not exist in the pass, and there are no logits or loss.
    #[arg(long, value_name = "N")]
    pub stop_at_layer: Option<usize>,
    /// Which logits the pass gathers: every position's, the last position's, or none
    /// (no LM head is computed); the loss is computed only with `all`.
    #[arg(long, value_enum, default_value_t = LogitsArg::All)]
    pub logits: LogitsArg,
}

/// `--logits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogitsArg {
    /// Every position's logits.
    All,
    /// The last position's logits.
    Last,
    /// No logits.
    None,
}

impl PassArgs {
    /// The scope these options describe.
    pub fn scope(&self) -> PassScope {
        PassScope {
            stop_at_layer: self.stop_at_layer,
            logits: match self.logits {
                LogitsArg::All => Logits::All,
                LogitsArg::Last => Logits::Last,
                LogitsArg::None => Logits::None,
            },
        }
    }

    /// Whether the passes compute every position's logits (and so the loss).
    pub fn full(&self) -> bool {
        self.scope() == PassScope::FULL
    }
}
