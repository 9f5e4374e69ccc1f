//! Linear layers and embeddings that hold one tensor-parallel slice of their weights.
//!
//! Megatron's scheme: a column-parallel linear keeps a slice of the output rows and
//! needs no communication; a row-parallel linear keeps a slice of the input columns
//! and sums its partial products across ranks; the vocabulary-parallel embedding keeps
//! a slice of the vocabulary and sums the (mostly zero) lookups across ranks. With one
//! rank every slice is the whole tensor and every collective is the identity.

use std::ops::Range;

use candle_core::Tensor;
use flexmodel_cluster::Collective;

use crate::Result;
use crate::weights::WeightSource;

/// `t[.., range, ..]` along `dim` in storage of its own, so a shard holds only its slice.
fn owned_slice(t: &Tensor, dim: usize, range: &Range<usize>) -> Result<Tensor> {
    if range.start == 0 && range.end == t.dim(dim)? {
        return Ok(t.clone());
    }
    Ok(t.narrow(dim, range.start, range.len())?
        .force_contiguous()?)
}

/// `x · wᵀ` for `x` of shape `[.., in]` and `w` of shape `[out, in]`.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, inner) = (x.elem_count() / x.dim(candle_core::D::Minus1)?, w.dim(1)?);
    let mut out_shape = x.dims().to_vec();
    let last = out_shape.len() - 1;
    out_shape[last] = w.dim(0)?;
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    Ok(y.reshape(out_shape)?)
}

/// A linear layer holding output rows `rows` of its `[out, in]` weight (and bias).
#[derive(Debug, Clone)]
pub struct ColumnParallelLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl ColumnParallelLinear {
    /// Loads rows `rows` of `{name}.weight` (shape `[out, in]`) and, with `bias`, of `{name}.bias`.
    pub fn load(
        weights: &dyn WeightSource,
        name: &str,
        out_in: [usize; 2],
        rows: Range<usize>,
        bias: bool,
    ) -> Result<Self> {
        let weight = weights.tensor_with_shape(&format!("{name}.weight"), &out_in)?;
        let bias = if bias {
            let b = weights.tensor_with_shape(&format!("{name}.bias"), &out_in[..1])?;
            Some(owned_slice(&b, 0, &rows)?)
        } else {
            None
        };
        Ok(Self {
            weight: owned_slice(&weight, 0, &rows)?,
            bias,
        })
    }

    /// A bias-free layer over rows `rows` of an already loaded `[out, in]` weight.
    pub fn from_weight(weight: &Tensor, rows: Range<usize>) -> Result<Self> {
        Ok(Self {
            weight: owned_slice(weight, 0, &rows)?,
            bias: None,
        })
    }

    /// This rank's slice of the output: `x · W_sliceᵀ + b_slice`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = matmul_t(x, &self.weight)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// The weight slice this rank holds.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// A linear layer holding input columns `cols` of its `[out, in]` weight; its output is
/// summed across the tensor-parallel group.
#[derive(Debug, Clone)]
pub struct RowParallelLinear {
    weight: Tensor,
}

impl RowParallelLinear {
    /// Loads columns `cols` of `{name}.weight` (shape `[out, in]`).
    pub fn load(
        weights: &dyn WeightSource,
        name: &str,
        out_in: [usize; 2],
        cols: Range<usize>,
    ) -> Result<Self> {
        let weight = weights.tensor_with_shape(&format!("{name}.weight"), &out_in)?;
        Ok(Self {
            weight: owned_slice(&weight, 1, &cols)?,
        })
    }

    /// `x_slice · W_sliceᵀ`, all-reduced: the full output on every rank.
    pub fn forward(&self, x: &Tensor, collective: &dyn Collective) -> Result<Tensor> {
        Ok(collective.all_reduce_sum(&matmul_t(x, &self.weight)?)?)
    }

    /// The weight slice this rank holds.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// A token embedding holding the rows of vocabulary slice `rows`.
#[derive(Debug, Clone)]
pub struct VocabParallelEmbedding {
    weight: Tensor,
    rows: Range<usize>,
}

impl VocabParallelEmbedding {
    /// Loads rows `rows` of `name` (shape `[vocab, d_model]`).
    pub fn load(
        weights: &dyn WeightSource,
        name: &str,
        vocab_d: [usize; 2],
        rows: Range<usize>,
    ) -> Result<Self> {
        let weight = weights.tensor_with_shape(name, &vocab_d)?;
        Ok(Self {
            weight: owned_slice(&weight, 0, &rows)?,
            rows,
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
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let local = if collective.tp_rank().size() == 1 {
            self.weight.embedding(&flat)?
        } else {
            // Ids outside this rank's rows look up row 0 and are then zeroed.
            let (local_ids, mask): (Vec<u32>, Vec<f32>) = flat
                .to_vec1::<u32>()?
                .into_iter()
                .map(|id| match self.rows.contains(&(id as usize)) {
                    true => (id - self.rows.start as u32, 1.0),
                    false => (0, 0.0),
                })
                .unzip();
            let n = local_ids.len();
            let device = self.weight.device();
            let rows = self
                .weight
                .embedding(&Tensor::from_vec(local_ids, n, device)?)?;
            let mask = Tensor::from_vec(mask, (n, 1), device)?.to_dtype(rows.dtype())?;
            rows.broadcast_mul(&mask)?
        };
        let d = local.dim(1)?;
        let summed = collective.all_reduce_sum(&local)?;
        Ok(summed.reshape((b, t, d))?)
    }
}
