//! The fused kernels against the chains they replace, and a weight's two layouts in a
//! matrix product, at SmolLM2's shapes for a batch of 4 × 128 tokens.
//!
//! ```sh
//! CANDLE_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=33554432 cargo bench -p flexmodel-kernels --bench kernels
//! ```
//!
//! The variables set what the `flexmodel` binary sets for itself: candle's elementwise
//! ops on the calling thread, and buffers up to 32 MB reused from the heap rather than
//! mapped afresh (and faulted in) for every op.

use candle_core::{D, DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use flexmodel_kernels::{attend, composed, rms, rope, scores, softmax_last_dim, swiglu};

const TOKENS: usize = 4 * 128;

fn tensor(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let values = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
    (values * 0.37)
        .unwrap()
        .sin()
        .unwrap()
        .reshape(shape)
        .unwrap()
}

fn kernels(c: &mut Criterion) {
    let (b, t, heads, d_head, d, hidden) = (4, 128, 9, 64, 576, 1536);
    let raw_scores = tensor(&[b, heads, t, t]);
    let mask = Tensor::tril2(t, DType::F32, &Device::Cpu).unwrap();
    let minus_inf = Tensor::full(f32::NEG_INFINITY, (t, t), &Device::Cpu).unwrap();
    let mask = mask
        .ne(0f32)
        .unwrap()
        .where_cond(&mask.zeros_like().unwrap(), &minus_inf)
        .unwrap();
    // SmolLM2's grouped heads: 3 key heads of 3 query heads each.
    let (q, k) = (tensor(&[b, 3, 3 * t, d_head]), tensor(&[b, 3, t, d_head]));
    let pattern = softmax_last_dim(&scores(&q, &k, &mask, 0.125).unwrap()).unwrap();
    let x = tensor(&[b, t, heads, d_head]);
    let angles = tensor(&[1, t, 1, d_head / 2]);
    let angles = Tensor::cat(&[&angles, &angles], D::Minus1).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let (gate, up) = (tensor(&[b, t, hidden]), tensor(&[b, t, hidden]));
    let resid = tensor(&[b, t, d]);

    let mut group = c.benchmark_group("fused vs composed");
    group.sample_size(20);
    group.bench_function("softmax fused", |bench| {
        bench.iter(|| softmax_last_dim(&raw_scores).unwrap())
    });
    group.bench_function("softmax composed", |bench| {
        bench.iter(|| composed::softmax_last_dim(&raw_scores).unwrap())
    });
    group.bench_function("scores fused", |bench| {
        bench.iter(|| scores(&q, &k, &mask, 0.125).unwrap())
    });
    group.bench_function("scores composed", |bench| {
        bench.iter(|| composed::scores(&q, &k, &mask, 0.125).unwrap())
    });
    group.bench_function("attend fused", |bench| {
        bench.iter(|| attend(&pattern, &k).unwrap())
    });
    group.bench_function("attend composed", |bench| {
        bench.iter(|| composed::attend(&pattern, &k).unwrap())
    });
    group.bench_function("rope fused", |bench| {
        bench.iter(|| rope(&x, &cos, &sin).unwrap())
    });
    group.bench_function("rope composed", |bench| {
        bench.iter(|| composed::rope(&x, &cos, &sin).unwrap())
    });
    group.bench_function("swiglu fused", |bench| {
        bench.iter(|| swiglu(&gate, &up).unwrap())
    });
    group.bench_function("swiglu composed", |bench| {
        bench.iter(|| composed::swiglu(&gate, &up).unwrap())
    });
    group.bench_function("rms fused", |bench| {
        bench.iter(|| rms(&resid, 1e-5).unwrap())
    });
    group.bench_function("rms composed", |bench| {
        bench.iter(|| composed::rms(&resid, 1e-5).unwrap())
    });
    group.finish();
}

/// `x · W` with `W` held `[in, out]` (as the model holds its blocks' weights) and as
/// the transpose of a `[out, in]` tensor (as Hugging Face lays them out).
fn weight_layouts(c: &mut Criterion) {
    let mut group = c.benchmark_group("weight layout");
    group.sample_size(10);
    for (name, inner, out) in [
        ("q_proj 576x576", 576, 576),
        ("k_proj 576x192", 576, 192),
        ("gate_proj 576x1536", 576, 1536),
        ("down_proj 1536x576", 1536, 576),
    ] {
        let x = tensor(&[TOKENS, inner]);
        let held = tensor(&[inner, out]);
        let out_in = held.t().unwrap().contiguous().unwrap();
        group.bench_function(format!("{name} [in, out]"), |bench| {
            bench.iter(|| x.matmul(&held).unwrap())
        });
        group.bench_function(format!("{name} [out, in] transposed"), |bench| {
            bench.iter(|| x.matmul(&out_in.t().unwrap()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, kernels, weight_layouts);
criterion_main!(benches);
