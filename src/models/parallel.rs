//! Linear layers and embeddings that hold one tensor-parallel slice of their weights.
//!
//! Megatron's scheme: a column-parallel linear keeps a slice of the output rows and
//! needs no communication; a row-parallel linear keeps a slice of the input columns
//! and sums its partial products across ranks; the vocabulary-parallel embedding keeps
//! a slice of the vocabulary and sums the (mostly zero) lookups across ranks. With one
//! rank every slice is the whole tensor and every collective is the identity.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use flexmodel_cluster::ParamSlice;
use flexmodel_cluster::{Collective, TpRank, conjugate};

use crate::Result;
use crate::weights::HeldWeights;

/// `t` as a trainable parameter: a candle variable, so that backward passes give its
/// gradient.
pub(crate) fn param(t: Tensor) -> Result<Tensor> {
    Ok(candle_core::Var::from_tensor(&t)?.as_tensor().clone())
}

/// `w` in the dtype of `x`, the activations: weights held in half precision are
/// computed with in the activations' dtype, converted one tensor at a time as each is
/// used (the product then reads the converted copy, which is freed after it).
pub(crate) fn like(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    match w.dtype() == x.dtype() {
        true => Ok(w.clone()),
        false => Ok(w.to_dtype(x.dtype())?),
    }
}

/// The dtype activations are computed in from weights held in `held` on `device`: f32
/// on the CPU, where candle's bf16 and f16 products are 1.6 to 2.2 times slower than
/// converting the weight to f32 and multiplying in f32 (see the README's half-precision
/// section); the held dtype elsewhere.
pub(crate) fn compute_dtype(held: DType, device: &Device) -> DType {
    match device {
        Device::Cpu => DType::F32,
        _ => held,
    }
}

/// `x · W` for `x` of shape `[.., in]`, where `w` is `W` (`[in, out]`) or, not
/// `transposed`, `Wᵀ` (`[out, in]`). Held `[in, out]`, a weight is read by the matrix
/// kernels in the order they pack it, which is faster than reading `[out, in]`
/// transposed (see the README's performance section).
fn product(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    let _op = crate::op_span!("matmul");
    let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
    let (inner, out) = match transposed {
        true => w.dims2()?,
        false => (w.dim(1)?, w.dim(0)?),
    };
    let mut out_shape = x.dims().to_vec();
    let last = out_shape.len() - 1;
    out_shape[last] = out;
    let x = x.reshape((rows, inner))?;
    let w = like(w, &x)?;
    let y = match transposed {
        true => x.matmul(&w)?,
        false => x.matmul(&w.t()?)?,
    };
    Ok(y.reshape(out_shape)?)
}

/// A function applied to every parameter tensor of a layer, giving the tensor the new
/// layer holds in its place (a piece of it, or the whole gathered from pieces).
pub type ParamMap<'a> = dyn FnMut(&Tensor) -> Result<Tensor> + 'a;

/// A linear layer holding output rows `rows` of its `[out, in]` weight (and bias).
#[derive(Debug, Clone)]
pub struct ColumnParallelLinear {
    name: String,
    rows: Range<usize>,
    /// The weight slice, `[in, rows]` when `transposed`, else `[rows, in]`.
    weight: Tensor,
    transposed: bool,
    bias: Option<Tensor>,
}

impl ColumnParallelLinear {
    /// Loads rows `rows` of `{name}.weight` (shape `[out, in]`, held transposed) and, with
    /// `bias`, of `{name}.bias`.
    pub fn load(
        weights: &HeldWeights<'_>,
        name: &str,
        out_in: [usize; 2],
        rows: Range<usize>,
        bias: bool,
    ) -> Result<Self> {
        let slice = Some((0, rows.clone()));
        let weight = weights.slice(&format!("{name}.weight"), &out_in, slice.clone())?;
        let bias = if bias {
            let b = weights.slice(&format!("{name}.bias"), &out_in[..1], slice)?;
            Some(param(b)?)
        } else {
            None
        };
        Ok(Self {
            name: name.to_string(),
            weight: param(weight.t()?.contiguous()?)?,
            transposed: true,
            rows,
            bias,
        })
    }

    /// A bias-free layer sharing `weight`, this rank's slice (rows `rows` of the full
    /// weight) of an already loaded parameter, as a tied LM head shares the embedding.
    pub fn from_weight(name: &str, weight: &Tensor, rows: Range<usize>) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            weight: weight.clone(),
            transposed: false,
            rows,
            bias: None,
        })
    }

    /// The weight (`{name}.weight`) and bias slices, split along dimension 0.
    pub fn parameters(&self) -> Vec<ParamSlice> {
        let slice = |suffix: &str, value: &Tensor, transposed| ParamSlice {
            name: format!("{}.{suffix}", self.name),
            value: value.clone(),
            split: Some((0, self.rows.clone())),
            piece: None,
            transposed,
        };
        let mut all = vec![slice("weight", &self.weight, self.transposed)];
        all.extend(self.bias.as_ref().map(|b| slice("bias", b, false)));
        all
    }

    /// The same layer with `f` of each of its tensors.
    pub fn map_parameters(&self, f: &mut ParamMap<'_>) -> Result<Self> {
        Ok(Self {
            name: self.name.clone(),
            rows: self.rows.clone(),
            weight: f(&self.weight)?,
            transposed: self.transposed,
            bias: self.bias.as_ref().map(&mut *f).transpose()?,
        })
    }

    /// This rank's slice of the output: `x · W_sliceᵀ + b_slice`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = product(x, &self.weight, self.transposed)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(&like(b, &y)?)?),
            None => Ok(y),
        }
    }

    /// Each head's slice of the output from its own input: `x` is `[b, t, heads, in]`,
    /// head `h` reads `x[.., h, ..]` and gets rows `h·e..(h+1)·e` of this rank's output
    /// slice (`e` = rows / heads); returns `[b, t, heads, e]`.
    pub fn forward_per_head(&self, x: &Tensor) -> Result<Tensor> {
        let _op = crate::op_span!("matmul");
        let (b, t, heads, inner) = x.dims4()?;
        let e = self.rows.len() / heads;
        // [heads, b·t, in] · [heads, in, e] = [heads, b·t, e]
        let x = x.permute((2, 0, 1, 3))?.reshape((heads, b * t, inner))?;
        let weight = like(&self.weight, &x)?;
        let w = match self.transposed {
            true => weight.reshape((inner, heads, e))?.transpose(0, 1)?,
            false => weight.reshape((heads, e, inner))?.transpose(1, 2)?,
        };
        let y = x.matmul(&w.contiguous()?)?.reshape((heads, b, t, e))?;
        let y = y.permute((1, 2, 0, 3))?;
        match &self.bias {
            Some(bias) => Ok(y
                .broadcast_add(&like(bias, &y)?.reshape((heads, e))?)?
                .contiguous()?),
            None => Ok(y.contiguous()?),
        }
    }

    /// The bias slice this rank holds, if the layer has a bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// A linear layer holding input columns `cols` of its `[out, in]` weight; its output is
/// summed across the tensor-parallel group.
#[derive(Debug, Clone)]
pub struct RowParallelLinear {
    name: String,
    cols: Range<usize>,
    /// The weight slice, held transposed: `[cols, out]`.
    weight: Tensor,
}

impl RowParallelLinear {
    /// Loads columns `cols` of `{name}.weight` (shape `[out, in]`, held transposed).
    pub fn load(
        weights: &HeldWeights<'_>,
        name: &str,
        out_in: [usize; 2],
        cols: Range<usize>,
    ) -> Result<Self> {
        let slice = Some((1, cols.clone()));
        let weight = weights.slice(&format!("{name}.weight"), &out_in, slice)?;
        Ok(Self {
            name: name.to_string(),
            weight: param(weight.t()?.contiguous()?)?,
            cols,
        })
    }

    /// The weight slice (`{name}.weight`), split along dimension 1.
    pub fn parameters(&self) -> Vec<ParamSlice> {
        vec![ParamSlice {
            name: format!("{}.weight", self.name),
            value: self.weight.clone(),
            split: Some((1, self.cols.clone())),
            piece: None,
            transposed: true,
        }]
    }

    /// The same layer with `f` of its weight.
    pub fn map_parameters(&self, f: &mut ParamMap<'_>) -> Result<Self> {
        Ok(Self {
            name: self.name.clone(),
            cols: self.cols.clone(),
            weight: f(&self.weight)?,
        })
    }

    /// `x_slice · W_sliceᵀ`, all-reduced: the full output on every rank.
    pub fn forward(&self, x: &Tensor, collective: &dyn Collective) -> Result<Tensor> {
        let partial = product(x, &self.weight, true)?;
        let _op = crate::op_span!("collective");
        Ok(conjugate::all_reduce_sum(&partial, collective)?)
    }

    /// Each head's term of this rank's partial product, not reduced: `x` is
    /// `[b, t, heads, e]` (this rank's input columns, `e` per head) and head `h`'s term is
    /// `x[.., h, ..] · W[:, h·e..(h+1)·e]ᵀ`; returns `[b, t, heads, out]`, whose sum over
    /// heads is the partial product.
    pub fn per_head(&self, x: &Tensor) -> Result<Tensor> {
        let _op = crate::op_span!("matmul");
        let (b, t, heads, e) = x.dims4()?;
        let out = self.weight.dim(1)?;
        // [heads, b·t, e] · [heads, e, out] = [heads, b·t, out]
        let x = x.permute((2, 0, 1, 3))?.reshape((heads, b * t, e))?;
        let w = like(&self.weight, &x)?.reshape((heads, e, out))?;
        let y = x.matmul(&w)?.reshape((heads, b, t, out))?;
        Ok(y.permute((1, 2, 0, 3))?.contiguous()?)
    }
}

/// Where each of `ids` falls in the vocabulary slice `rows`: its row in the slice (0 for
/// ids outside it) and a mask, `[n, 1]`, that is 1 for ids inside and 0 outside; the
/// rank that holds an id's row contributes it, the others add zero.
pub(crate) fn rows_in_slice(
    ids: &[u32],
    rows: &Range<usize>,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let (local, mask): (Vec<u32>, Vec<f32>) = ids
        .iter()
        .map(|&id| match rows.contains(&(id as usize)) {
            true => (id - rows.start as u32, 1.0),
            false => (0, 0.0),
        })
        .unzip();
    let n = local.len();
    Ok((
        Tensor::from_vec(local, n, device)?,
        Tensor::from_vec(mask, (n, 1), device)?,
    ))
}

/// A token embedding holding the rows of vocabulary slice `rows`.
#[derive(Debug, Clone)]
pub struct VocabParallelEmbedding {
    name: String,
    weight: Tensor,
    rows: Range<usize>,
}

impl VocabParallelEmbedding {
    /// Loads rows `rows` of `name` (shape `[vocab, d_model]`).
    pub fn load(
        weights: &HeldWeights<'_>,
        name: &str,
        vocab_d: [usize; 2],
        rows: Range<usize>,
    ) -> Result<Self> {
        let weight = weights.slice(name, &vocab_d, Some((0, rows.clone())))?;
        Ok(Self {
            name: name.to_string(),
            weight: param(weight)?,
            rows,
        })
    }

    /// The embedding rows, split along dimension 0.
    pub fn parameters(&self) -> Vec<ParamSlice> {
        vec![ParamSlice {
            name: self.name.clone(),
            value: self.weight.clone(),
            split: Some((0, self.rows.clone())),
            piece: None,
            transposed: false,
        }]
    }

    /// The same embedding with `f` of its weight.
    pub fn map_parameters(&self, f: &mut ParamMap<'_>) -> Result<Self> {
        Ok(Self {
            name: self.name.clone(),
            weight: f(&self.weight)?,
            rows: self.rows.clone(),
        })
    }

    /// The embedding rows this rank holds, `[rows.len(), d_model]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The vocabulary slice this rank holds.
    pub fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// The embeddings of `ids` (`[b, t]`, u32, already checked against the vocabulary),
    /// each looked up by the rank that holds its row and summed across the group.
    pub fn forward(&self, ids: &Tensor, collective: &dyn Collective) -> Result<Tensor> {
        let _op = crate::op_span!("embed");
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let local = if collective.tp_rank().size() == 1 {
            self.weight.embedding(&flat)?
        } else {
            // Ids outside this rank's rows look up row 0 and are then zeroed.
            let ids = flat.to_vec1::<u32>()?;
            let (local, mask) = rows_in_slice(&ids, &self.rows, self.weight.device())?;
            let rows = self.weight.embedding(&local)?;
            rows.broadcast_mul(&mask.to_dtype(rows.dtype())?)?
        };
        let local = local.to_dtype(compute_dtype(local.dtype(), local.device()))?;
        let d = local.dim(1)?;
        let _op = crate::op_span!("collective");
        let summed = conjugate::all_reduce_sum(&local, collective)?;
        Ok(summed.reshape((b, t, d))?)
    }
}

/// The key/value heads of `tp`: an even slice when the heads split over the ranks, or
/// the one head this rank's query heads read when there are more ranks than heads (each
/// key/value head is then replicated on `tp / n_kv_heads` ranks).
pub fn kv_heads_of(tp: TpRank, n_kv_heads: usize) -> Result<std::ops::Range<usize>> {
    if tp.size() <= n_kv_heads {
        return Ok(tp.slice_of("num_key_value_heads", n_kv_heads)?);
    }
    if !tp.size().is_multiple_of(n_kv_heads) {
        return Err(flexmodel_cluster::Error::UnevenSplit {
            what: "num_key_value_heads (replicated)".into(),
            size: n_kv_heads,
            parts: tp.size(),
        }
        .into());
    }
    let head = tp.rank() / (tp.size() / n_kv_heads);
    Ok(head..head + 1)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use candle_core::Device;
    use flexmodel_cluster::{InProcessCollective, PassControl, SingleRank};

    use super::*;
    use crate::weights::TensorMap;

    fn weights(shape: (usize, usize)) -> TensorMap {
        let n = (shape.0 * shape.1) as f64;
        let w = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap();
        let w = ((w / n).unwrap().sin().unwrap()).reshape(shape).unwrap();
        TensorMap::new("test", BTreeMap::from([("w.weight".to_string(), w)]))
    }

    fn input(rows: usize, cols: usize) -> Tensor {
        Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)
            .unwrap()
            .cos()
            .unwrap()
            .reshape((1, rows, cols))
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar().unwrap()
    }

    /// Runs `work` for every member of an in-process group of `size`, each on a thread.
    fn on_group<T: Send>(size: usize, work: impl Fn(&InProcessCollective) -> T + Sync) -> Vec<T> {
        let members = InProcessCollective::group(size, Arc::new(PassControl::default())).unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = members.iter().map(|m| s.spawn(|| work(m))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn column_slices_concatenate_to_the_full_output() {
        let map = weights((6, 4));
        let src = HeldWeights::f32(&map);
        let x = input(3, 4);
        let full = ColumnParallelLinear::load(&src, "w", [6, 4], 0..6, false).unwrap();
        let pieces: Vec<Tensor> = [0..2, 2..4, 4..6]
            .into_iter()
            .map(|rows| ColumnParallelLinear::load(&src, "w", [6, 4], rows, false).unwrap())
            .map(|layer| layer.forward(&x).unwrap())
            .collect();
        let joined = Tensor::cat(&pieces, 2).unwrap();
        assert!(max_diff(&joined, &full.forward(&x).unwrap()) < 1e-6);
    }

    #[test]
    fn row_slices_all_reduce_to_the_full_output() {
        let map = weights((5, 6));
        let src = HeldWeights::f32(&map);
        let x = input(3, 6);
        let full = RowParallelLinear::load(&src, "w", [5, 6], 0..6).unwrap();
        let full = full.forward(&x, &SingleRank).unwrap();
        let outputs = on_group(2, |member| {
            let cols = member.tp_rank().slice_of("in", 6).unwrap();
            let layer = RowParallelLinear::load(&src, "w", [5, 6], cols.clone()).unwrap();
            let (held, _) = layer.parameters().remove(0).presented(None).unwrap();
            assert_eq!(held.value.dims(), [5, 3], "a rank holds only its columns");
            layer
                .forward(&x.narrow(2, cols.start, cols.len()).unwrap(), member)
                .unwrap()
        });
        for out in outputs {
            assert!(max_diff(&out, &full) < 1e-5);
        }
    }

    #[test]
    fn vocabulary_slices_all_reduce_to_the_full_embedding() {
        let map = weights((8, 3));
        let src = HeldWeights::f32(&map);
        let ids = Tensor::new(&[[0u32, 3, 4, 7]], &Device::Cpu).unwrap();
        let full = VocabParallelEmbedding::load(&src, "w.weight", [8, 3], 0..8).unwrap();
        let full = full.forward(&ids, &SingleRank).unwrap();
        let outputs = on_group(2, |member| {
            let rows = member.tp_rank().slice_of("vocab", 8).unwrap();
            let e = VocabParallelEmbedding::load(&src, "w.weight", [8, 3], rows).unwrap();
            assert_eq!(e.weight().dims(), [4, 3], "a rank holds only its rows");
            e.forward(&ids, member).unwrap()
        });
        for out in outputs {
            assert!(max_diff(&out, &full) < 1e-6);
        }
    }
}
