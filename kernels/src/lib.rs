//! Fused CPU kernels for the elementwise chains of a LLaMA-family pass.
//!
//! Each op computes in one sweep over its input what the model would otherwise compute
//! as a chain of candle's elementwise ops (one full read and write of the activation per
//! link), splitting its rows over rayon's pool, where candle's matrix products run too.
//! Each is a candle custom op whose backward pass is written with candle's own ops, so
//! gradients flow through it as through the chain it replaces.
//!
//! The fused path takes float32 tensors on the CPU. Any other dtype or device takes the
//! [`composed`] chain, which is also the reference the tests hold the kernels to.
//!
//! | op | replaces |
//! |---|---|
//! | [`softmax_last_dim`] | `exp(x − max) / Σ exp(x − max)` |
//! | [`rope`] | `x·cos + rotate_half(x)·sin` |
//! | [`swiglu`] | `silu(gate) · up` |
//! | [`rms`] | `√(mean(x²) + ε)` over the last dimension |
//! | [`scores`] | `q · kᵀ · scale + mask` (summed over the head's width in order, masked ones skipped) |
//! | [`attend`] | `pattern · v` (summed over the keys in order, for results that no masked key changes) |

mod attend;
pub mod composed;
mod exp;
mod rms;
mod rope;
mod rows;
mod scores;
mod softmax;
mod swiglu;

pub use attend::attend;
pub use rms::rms;
pub use rope::rope;
pub use scores::scores;
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;

/// Whether `tensors` can take a fused kernel: float32 on the CPU.
fn fusable(tensors: &[&candle_core::Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}
