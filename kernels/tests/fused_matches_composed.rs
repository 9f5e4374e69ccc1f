//! Every fused kernel against the chain of candle ops it replaces: the values, and the
//! gradients autograd takes through each.

use candle_core::{D, DType, Device, Tensor, Var};
use flexmodel_kernels::{attend, composed, rms, rope, scores, softmax_last_dim, swiglu};

/// The largest `|a − b| / max|b|`.
fn rel_error(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    (diff / scale).unwrap().to_scalar::<f32>().unwrap()
}

/// Values drawn uniformly from [−2, 2) with `seed`.
fn uniform(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// The gradient of `Σ f(x)·w` (a fixed random weighting) at `x`.
fn grad_of(x: &Tensor, w: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let var = Var::from_tensor(x).unwrap();
    let loss = (f(var.as_tensor()) * w).unwrap().sum_all().unwrap();
    loss.backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .clone()
}

/// `fused` and `composed` agree on `x`: the values to `tol.0` and the gradients to
/// `tol.1` (relative to the largest).
fn agree(
    x: &Tensor,
    fused: impl Fn(&Tensor) -> Tensor,
    composed: impl Fn(&Tensor) -> Tensor,
    tol: (f32, f32),
) {
    let (ours, theirs) = (fused(x), composed(x));
    assert_eq!(ours.dims(), theirs.dims());
    let err = rel_error(&ours, &theirs);
    assert!(err <= tol.0, "values: relative error {err:e}");
    let w = uniform(ours.dims(), 7);
    let err = rel_error(&grad_of(x, &w, fused), &grad_of(x, &w, composed));
    assert!(err <= tol.1, "gradients: relative error {err:e}");
}

#[test]
fn softmax_equals_the_composed_chain_and_so_do_its_gradients() {
    // A causal mask's −∞ in every row but the first entry, as attention has.
    let mask = Tensor::tril2(130, DType::F32, &Device::Cpu).unwrap();
    let mask = ((mask - 1.0).unwrap() * 1e30).unwrap();
    let x = uniform(&[3, 2, 130, 130], 1).broadcast_add(&mask).unwrap();
    let x = x.clamp(-1e30f32, 1e30f32).unwrap();
    agree(
        &x,
        |x| softmax_last_dim(x).unwrap(),
        |x| composed::softmax_last_dim(x).unwrap(),
        // Measured: 8.9e-8 and 2.2e-7 (a polynomial eˣ, the sums in another order).
        (1e-6, 2e-6),
    );
    let rows = softmax_last_dim(&x).unwrap().sum(D::Minus1).unwrap();
    let ones = Tensor::ones_like(&rows).unwrap();
    assert!(rel_error(&rows, &ones) < 1e-6);
}

#[test]
fn rope_equals_the_composed_chain_bit_for_bit_for_shared_and_per_sequence_angles() {
    for n in [1, 3] {
        let angles = uniform(&[n, 50, 1, 16], 2);
        let angles = Tensor::cat(&[&angles, &angles], D::Minus1).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let x = uniform(&[3, 50, 5, 32], 3);
        let fused = rope(&x, &cos, &sin).unwrap();
        let chain = composed::rope(&x, &cos, &sin).unwrap();
        assert_eq!(rel_error(&fused, &chain), 0.0, "n = {n}");
        agree(
            &x,
            |x| rope(x, &cos, &sin).unwrap(),
            |x| composed::rope(x, &cos, &sin).unwrap(),
            (0.0, 0.0),
        );
    }
}

#[test]
fn swiglu_equals_the_composed_chain_and_so_do_both_gradients() {
    let (gate, up) = (uniform(&[4, 70, 300], 4), uniform(&[4, 70, 300], 5));
    agree(
        &gate,
        |g| swiglu(g, &up).unwrap(),
        |g| composed::swiglu(g, &up).unwrap(),
        // Measured: 1.4e-7 and 1.1e-7 (a polynomial eˣ; the derivative in another form).
        (1e-6, 1e-6),
    );
    agree(
        &up,
        |u| swiglu(&gate, u).unwrap(),
        |u| composed::swiglu(&gate, u).unwrap(),
        // Measured: 1.4e-7 and 6.8e-8.
        (1e-6, 1e-6),
    );
}

#[test]
fn rms_equals_the_composed_chain_and_so_does_its_gradient() {
    let x = uniform(&[4, 70, 576], 6);
    agree(
        &x,
        |x| rms(x, 1e-5).unwrap(),
        |x| composed::rms(x, 1e-5).unwrap(),
        // Measured: 9.7e-8 and 2.3e-7 (the sum of squares in another order).
        (1e-6, 2e-6),
    );
    assert_eq!(rms(&x, 1e-5).unwrap().dims(), [4, 70, 1]);
}

#[test]
fn scores_equal_the_composed_chain_for_both_mask_shapes_and_so_do_the_gradients() {
    // Two query heads per key head, 40 queries each, against 60 keys (20 cached).
    let (q, k) = (uniform(&[2, 3, 80, 32], 8), uniform(&[2, 3, 60, 32], 9));
    let keep = Tensor::tril2(60, DType::F32, &Device::Cpu).unwrap();
    let keep = keep.narrow(0, 20, 40).unwrap();
    let minus_inf = Tensor::full(f32::NEG_INFINITY, (40, 60), &Device::Cpu).unwrap();
    let causal = keep
        .ne(0f32)
        .unwrap()
        .where_cond(&keep.zeros_like().unwrap(), &minus_inf)
        .unwrap();
    let per_sequence = uniform(&[2, 1, 40, 60], 10).broadcast_add(&causal).unwrap();
    // Compared after the softmax, which turns the masked −∞ into zeros.
    for mask in [causal, per_sequence] {
        let fused = |q: &Tensor, k: &Tensor| softmax_last_dim(&scores(q, k, &mask, 0.125).unwrap());
        let chain = |q: &Tensor, k: &Tensor| {
            composed::softmax_last_dim(&composed::scores(q, k, &mask, 0.125).unwrap())
        };
        // Measured: 1.6e-7 and 3.4e-7 (sums in another order).
        agree(
            &q,
            |q| fused(q, &k).unwrap(),
            |q| chain(q, &k).unwrap(),
            (1e-6, 1e-6),
        );
        agree(
            &k,
            |k| fused(&q, k).unwrap(),
            |k| chain(&q, k).unwrap(),
            (1e-6, 1e-6),
        );
    }
}

#[test]
fn attend_equals_the_matrix_product_and_so_do_both_gradients() {
    let mask = Tensor::tril2(70, DType::F32, &Device::Cpu).unwrap();
    let pattern = softmax_last_dim(
        &uniform(&[2, 3, 70, 70], 14)
            .broadcast_add(&((mask - 1.0).unwrap() * 1e30).unwrap())
            .unwrap(),
    )
    .unwrap();
    let v = uniform(&[2, 3, 70, 64], 15);
    agree(
        &pattern,
        |p| attend(p, &v).unwrap(),
        |p| composed::attend(p, &v).unwrap(),
        // Measured: 0 and 0 (both sum each output by fused multiply-adds in key order;
        // a blocked product need not, so the bound allows a rounding).
        (1e-7, 1e-7),
    );
    agree(
        &v,
        |v| attend(&pattern, v).unwrap(),
        |v| composed::attend(&pattern, v).unwrap(),
        (1e-7, 1e-7),
    );
}

#[test]
fn masked_keys_after_a_querys_own_change_no_bit_of_scores_softmax_or_attend() {
    // 20 real keys alone, then the same keys followed by 37 masked ones.
    let raw = uniform(&[1, 2, 20, 20], 16);
    let v = uniform(&[1, 2, 20, 64], 17);
    let longer = Tensor::cat(
        &[
            &raw,
            &Tensor::full(f32::NEG_INFINITY, (1, 2, 20, 37), &Device::Cpu).unwrap(),
        ],
        D::Minus1,
    )
    .unwrap();
    let more_values = Tensor::cat(&[&v, &uniform(&[1, 2, 37, 64], 18)], 2).unwrap();
    let (alone, padded) = (
        softmax_last_dim(&raw).unwrap(),
        softmax_last_dim(&longer).unwrap(),
    );
    assert_eq!(
        rel_error(&padded.narrow(3, 0, 20).unwrap(), &alone),
        0.0,
        "softmax"
    );
    // Scores of 20 queries against their keys, then against those and 37 more, masked.
    let (q, k) = (uniform(&[1, 2, 20, 32], 19), uniform(&[1, 2, 20, 32], 20));
    let more_keys = Tensor::cat(&[&k, &uniform(&[1, 2, 37, 32], 21)], 2).unwrap();
    let mask = Tensor::zeros((20, 20), DType::F32, &Device::Cpu).unwrap();
    let more_mask = Tensor::cat(
        &[
            &mask,
            &Tensor::full(f32::NEG_INFINITY, (20, 37), &Device::Cpu).unwrap(),
        ],
        1,
    )
    .unwrap();
    let own = scores(&q, &k, &mask, 0.5).unwrap();
    let with_more = scores(&q, &more_keys, &more_mask, 0.5).unwrap();
    assert_eq!(
        rel_error(&with_more.narrow(3, 0, 20).unwrap(), &own),
        0.0,
        "scores"
    );
    let z = attend(&alone, &v).unwrap();
    let z_padded = attend(&padded, &more_values).unwrap();
    assert_eq!(rel_error(&z_padded, &z), 0.0, "attend");
}

#[test]
fn shapes_the_kernels_cannot_take_are_errors_naming_the_shapes() {
    let x = uniform(&[2, 5, 3, 8], 11);
    let wrong = uniform(&[1, 4, 1, 8], 12);
    let err = rope(&x, &wrong, &wrong).unwrap_err().to_string();
    assert!(err.contains("[1, 4, 1, 8]"), "{err}");
    let err = swiglu(&x, &wrong).unwrap_err().to_string();
    assert!(err.contains("differ"), "{err}");
    let err = scores(&x, &x, &wrong, 1.0).unwrap_err().to_string();
    assert!(err.contains("mask"), "{err}");
    let err = attend(&x, &wrong).unwrap_err().to_string();
    assert!(err.contains("[1, 4, 1, 8]"), "{err}");
}

#[test]
fn other_dtypes_take_the_composed_chain() {
    let x = uniform(&[2, 3, 64], 13).to_dtype(DType::F64).unwrap();
    let fused = softmax_last_dim(&x).unwrap();
    let chain = composed::softmax_last_dim(&x).unwrap();
    assert_eq!(fused.dtype(), DType::F64);
    let diff = (fused - chain).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
}
