//! Collectives as steps of the autograd graph, each with its conjugate in backward
//! (Megatron's `f` and `g`): the all-reduce after a row-parallel linear passes the
//! gradient through unchanged, and the identity before a column-parallel linear
//! all-reduces the gradient. FSDP's gather of a parameter's pieces reduce-scatters its
//! gradient.

use std::ops::Range;
use std::sync::Arc;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use crate::{Collective, Result};

/// The sum of every member's `x`; in backward, each member's `x` gets the gradient of
/// the sum unchanged.
pub fn all_reduce_sum(x: &Tensor, collective: &dyn Collective) -> Result<Tensor> {
    if collective.tp_rank().size() == 1 {
        return Ok(x.clone());
    }
    let sum = collective.all_reduce_sum(&x.detach())?;
    substitute(x, &sum, |grad| Ok(grad.clone()))
}

/// `value` in place of `x`: in backward, the gradient of the result goes
/// through `f` and on to `x`. For values computed elsewhere from `x`, such as an
/// all-reduce or an edit run by the coordinator. An error of `f` fails the backward
/// pass (wrap errors of other types with [`candle_core::Error::wrap`]).
pub fn substitute(
    x: &Tensor,
    value: &Tensor,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    Ok(x.apply_op2(&value.contiguous()?, Substitute(Box::new(f)))?)
}

/// `x` unchanged; in backward, the gradients of every member are summed. For the
/// replicated input of a column-parallel linear, whose ranks each see part of its use.
pub fn copy_to_group(x: &Tensor, collective: &Arc<dyn Collective>) -> Result<Tensor> {
    if collective.tp_rank().size() == 1 {
        return Ok(x.clone());
    }
    let collective = collective.clone();
    on_backward(x, move |grad| {
        collective
            .all_reduce_sum(grad)
            .map_err(candle_core::Error::wrap)
    })
}

/// The whole of a tensor of `len` along `dim` whose pieces along it are spread over the
/// group, in rank order as [`split_evenly`](crate::split_evenly) cuts them: every
/// member's piece concatenated.
/// In backward, each member's piece gets the sum over the members of the gradient at
/// its own rows — a reduce-scatter — so that the members together hold the gradient of
/// the whole tensor once. FSDP gathers a shard's parameters this way. A piece outside
/// any autograd graph (detached) gives the whole outside it too: nothing keeps it
/// alive but its own uses.
pub fn gather_pieces(
    piece: &Tensor,
    dim: usize,
    len: usize,
    collective: &Arc<dyn Collective>,
) -> Result<Tensor> {
    if collective.tp_rank().size() == 1 {
        return Ok(piece.clone());
    }
    let whole = gather_checked(&piece.detach(), dim, len, collective.as_ref())?;
    if !piece.track_op() {
        return Ok(whole);
    }
    let collective = collective.clone();
    substitute(piece, &whole, move |grad| {
        collective
            .reduce_scatter_sum(&grad.contiguous()?, dim)
            .map_err(candle_core::Error::wrap)
    })
}

/// The most bytes of its piece a member sends in one all-gather of [`gather_pieces`]:
/// a larger piece goes in chunks, each written into the whole as it arrives, so that
/// beside the whole no more than a chunk of each piece is in flight.
const CHUNK_BYTES: usize = 8 << 20;

/// Every member's piece along `dim` joined into the whole of `len`, after checking that
/// this member's piece is the one [`split_evenly`](crate::split_evenly) cuts for it.
fn gather_checked(
    piece: &Tensor,
    dim: usize,
    len: usize,
    collective: &dyn Collective,
) -> Result<Tensor> {
    let member = collective.tp_rank();
    let (size, me) = (member.size(), member.rank());
    let rows = crate::split_evenly(len, size);
    if rows[me].len() != piece.dim(dim)? {
        return Err(crate::Error::UnevenSplit {
            what: "a gathered tensor's pieces".into(),
            size: len,
            parts: size,
        });
    }
    // Every member computes the same number of chunks, from `len` alone.
    let row_bytes = piece.elem_count() / piece.dim(dim)?.max(1) * piece.dtype().size_in_bytes();
    let fewest = rows.iter().map(|r| r.len()).min().unwrap_or(0).max(1);
    let chunks = (rows[0].len() * row_bytes)
        .div_ceil(CHUNK_BYTES)
        .clamp(1, fewest);
    if chunks == 1 {
        return collective.all_gather(&piece.contiguous()?, dim);
    }
    let mut shape = piece.dims().to_vec();
    shape[dim] = len;
    let whole = Tensor::zeros(shape, piece.dtype(), piece.device())?;
    let parts: Vec<Vec<Range<usize>>> = rows
        .iter()
        .map(|r| crate::split_evenly(r.len(), chunks))
        .collect();
    for j in 0..chunks {
        let own = &parts[me][j];
        let chunk = piece.narrow(dim, own.start, own.len())?.contiguous()?;
        let gathered = collective.all_gather(&chunk, dim)?;
        let mut at = 0;
        for (held, member_parts) in rows.iter().zip(&parts) {
            let part = &member_parts[j];
            let rows_of_member = gathered.narrow(dim, at, part.len())?.contiguous()?;
            whole.slice_set(&rows_of_member, dim, held.start + part.start)?;
            at += part.len();
        }
    }
    Ok(whole)
}

/// What [`on_backward`] and [`substitute`] do with a gradient.
pub type BackwardFn = dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// `x` unchanged; in backward, the gradient of the result goes through `f` before it
/// flows on to `x` (to observe, reduce or edit gradients).
pub fn on_backward(
    x: &Tensor,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    Ok(x.apply_op1(OnBackward(Box::new(f)))?)
}

/// A contiguous copy of the elements `layout` selects from `storage`, on its device.
fn copy_of<S>(storage: &S, layout: &Layout) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let shape = layout.shape();
    // SAFETY: every element of the new storage is written by the copy that follows.
    let mut copy = unsafe { storage.device().alloc_uninit(shape, storage.dtype())? };
    storage.copy_strided_src(&mut copy, 0, layout)?;
    Ok((copy, shape.clone()))
}

/// Forward: the value of the second argument; backward: the gradient, through a
/// function, goes to the first.
struct Substitute(Box<BackwardFn>);

impl CustomOp2 for Substitute {
    fn name(&self) -> &'static str {
        "substitute"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        copy_of(s2, l2)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        copy_of(s2, l2)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.0)(grad)?), None))
    }
}

/// Forward: the identity; backward: the gradient through a function.
struct OnBackward(Box<BackwardFn>);

impl CustomOp1 for OnBackward {
    fn name(&self) -> &'static str {
        "on-backward"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        copy_of(storage, layout)
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        copy_of(storage, layout)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.0)(grad)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::{InProcessCollective, PassControl};

    /// Runs `work` for every member of a group of `size` on its own thread.
    fn on_group<T: Send>(size: usize, work: impl Fn(Arc<dyn Collective>) -> T + Sync) -> Vec<T> {
        let members = InProcessCollective::group(size, Arc::new(PassControl::default())).unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = members
                .into_iter()
                .map(|m| {
                    let work = &work;
                    s.spawn(move || work(Arc::new(m) as Arc<dyn Collective>))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn vector(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    #[test]
    fn all_reduce_passes_the_gradient_through_unchanged() {
        let results = on_group(2, |c| {
            let r = c.tp_rank().rank() as f32;
            let x = Var::new(&[1.0 + r, 2.0 * r][..], &Device::Cpu).unwrap();
            let y = all_reduce_sum(x.as_tensor(), c.as_ref()).unwrap();
            let loss = (&y * &vector(&[3.0, 5.0])).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            (
                y.to_vec1::<f32>().unwrap(),
                grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            )
        });
        for (y, grad) in results {
            assert_eq!(y, [3.0, 2.0]);
            assert_eq!(grad, [3.0, 5.0]);
        }
    }

    #[test]
    fn pieces_larger_than_a_chunk_gather_in_chunks_to_the_same_whole() {
        // 7 rows (or columns) of 4 MiB in pieces of 3, 2 and 2: two chunks each.
        let big = 1 << 20;
        let whole = Tensor::arange(0f32, (7 * big) as f32, &Device::Cpu).unwrap();
        for (dim, whole) in [
            (0, whole.reshape((7, big)).unwrap()),
            (1, whole.reshape((big, 7)).unwrap()),
        ] {
            let gathered = on_group(3, |c| {
                let r = c.tp_rank().rank();
                let rows = crate::split_evenly(7, 3)[r].clone();
                let piece = whole.narrow(dim, rows.start, rows.len()).unwrap();
                let piece = piece.contiguous().unwrap().detach();
                gather_pieces(&piece, dim, 7, &c).unwrap()
            });
            for g in gathered {
                let differs = (&g - &whole).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(differs.to_scalar::<f32>().unwrap(), 0.0, "along {dim}");
            }
        }
    }

    #[test]
    fn gathered_pieces_are_the_whole_and_each_piece_gets_the_summed_gradient_of_its_rows() {
        // A [5, 2] tensor in pieces of 2, 2 and 1 rows.
        let whole: Vec<f32> = (0..10).map(|v| v as f32).collect();
        let results = on_group(3, |c| {
            let r = c.tp_rank().rank();
            let rows = crate::split_evenly(5, 3)[r].clone();
            let piece = Tensor::from_vec(
                whole[rows.start * 2..rows.end * 2].to_vec(),
                (rows.len(), 2),
                &Device::Cpu,
            )
            .unwrap();
            let piece = Var::from_tensor(&piece).unwrap();
            let gathered = gather_pieces(piece.as_tensor(), 0, 5, &c).unwrap();
            // Member r weighs every entry by r + 1.
            let weight = Tensor::full(r as f32 + 1.0, (5, 2), &Device::Cpu).unwrap();
            let loss = (&gathered * &weight).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let untracked = gather_pieces(&piece.as_tensor().detach(), 0, 5, &c).unwrap();
            assert!(!untracked.track_op());
            (
                gathered.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                grads
                    .get(piece.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                untracked.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        });
        let lengths = [4, 4, 2];
        for ((gathered, grad, untracked), len) in results.into_iter().zip(lengths) {
            assert_eq!(
                untracked, whole,
                "a detached piece gathers to the same whole"
            );
            assert_eq!(gathered, whole);
            // 1 + 2 + 3 at every entry of the member's own piece.
            assert_eq!(grad, vec![6.0; len]);
        }
    }

    #[test]
    fn copy_to_group_sums_the_gradients_of_every_member() {
        let grads = on_group(3, |c| {
            let r = c.tp_rank().rank() as f32;
            let x = Var::new(&[1.0f32, 1.0][..], &Device::Cpu).unwrap();
            let z = copy_to_group(x.as_tensor(), &c).unwrap();
            // Each member uses the input with its own weights, as a column-parallel slice does.
            let loss = (&z * &vector(&[r, 10.0 * r])).unwrap().sum_all().unwrap();
            loss.backward()
                .unwrap()
                .get(x.as_tensor())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        });
        assert_eq!(grads, vec![vec![3.0, 30.0]; 3]);
    }
}
