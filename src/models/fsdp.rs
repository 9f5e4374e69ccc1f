//! FSDP: a shard's parameters cut into pieces across its data-parallel replicas, and
//! gathered whole just before the layer that uses them computes.
//!
//! Each parameter (the tensor-parallel slice a rank holds) is cut along the dimension
//! tensor parallelism slices it (dimension 0 where it is whole), as
//! [`split_evenly`](flexmodel_cluster::split_evenly) cuts it, replica `r` keeping piece `r`; a replica reads only its piece from the
//! checkpoint ([`PieceReads`]). [`Fsdp::gathered`] joins every replica's
//! pieces of one layer through the replicas' collective. In a pass without a backward
//! pass the gathered layer is outside the autograd graph and is freed as soon as the
//! layer has computed; in a pass with one it lives in the graph until the gradients are
//! computed, when the gather's conjugate sums each piece's gradient over the replicas
//! (a reduce-scatter), so that each replica keeps the gradient of its own piece of the
//! whole batch.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::TensorId;
use flexmodel_cluster::{Collective, ParamSlice, conjugate};

use crate::models::parallel::ParamMap;
use crate::weights::PieceReads;
use crate::{Error, Result};

/// A shard's place among its replicas under FSDP, and the pieces it holds.
pub(crate) struct Fsdp {
    /// The replicas holding the other pieces, this shard's replica among them.
    replicas: Arc<dyn Collective>,
    /// Each piece held, by its tensor: the dimension it is cut along, its range of the
    /// tensor-parallel slice along it, and the slice's length along it.
    pieces: HashMap<TensorId, (usize, Range<usize>, usize)>,
}

impl Fsdp {
    /// A shard holding no piece yet, among `replicas`.
    pub(crate) fn new(replicas: Arc<dyn Collective>) -> Self {
        Self {
            replicas,
            pieces: HashMap::new(),
        }
    }

    /// What this replica reads: its piece of every slice.
    pub(crate) fn reads(&self) -> PieceReads {
        PieceReads::new(self.replicas.tp_rank())
    }

    /// Takes `layer`, loaded through `reads` (so holding this replica's piece of each of
    /// its `parameters`), as this shard's: its pieces are gathered whole when it
    /// computes. A piece shared with a layer taken before (a tied LM head) stays one.
    pub(crate) fn adopt<M>(
        &mut self,
        layer: M,
        parameters: Vec<ParamSlice>,
        reads: &PieceReads,
    ) -> Result<M> {
        for p in parameters {
            let id = p.value.id();
            if self.pieces.contains_key(&id) {
                continue;
            }
            let read = reads
                .of(&p.name)
                .ok_or(Error::Internal("a parameter under FSDP read whole"))?;
            // The dimension of the parameter; `value` may hold it transposed.
            let dim = p.held_dim(read.dim);
            self.pieces.insert(id, (dim, read.range, read.len));
        }
        Ok(layer)
    }

    /// The whole layer, rebuilt by `map` from every replica's pieces. With `tracked`,
    /// the gather is part of the autograd graph (see the module's documentation).
    pub(crate) fn gathered<M>(
        &self,
        tracked: bool,
        map: impl FnOnce(&mut ParamMap<'_>) -> Result<M>,
    ) -> Result<M> {
        map(&mut |piece| {
            let _op = crate::op_span!("collective");
            let (dim, _, len) = self
                .pieces
                .get(&piece.id())
                .ok_or(Error::Internal("a layer's tensor that is not a piece"))?;
            let piece = match tracked {
                true => piece.clone(),
                false => piece.detach(),
            };
            Ok(conjugate::gather_pieces(
                &piece,
                *dim,
                *len,
                &self.replicas,
            )?)
        })
    }

    /// `slice` as this replica holds it: with its piece, if it is one.
    pub(crate) fn describe(&self, slice: ParamSlice) -> ParamSlice {
        let piece = self.pieces.get(&slice.value.id());
        let piece = piece.map(|(dim, range, _)| (slice.held_dim(*dim), range.clone()));
        ParamSlice { piece, ..slice }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use flexmodel_actors::Window;
    use flexmodel_cluster::{InProcessCollective, PassControl, SingleRank, split_evenly};

    use super::*;
    use crate::NoHooks;
    use crate::models::DecoderBlock;
    use crate::models::llama::block::Block;
    use crate::models::positions::Positions;
    use crate::models::{Llama, ModelShard, Stage};
    use crate::tiny::{tiny_checkpoint, tiny_config};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::weights::{HeldWeights, WeightSource};

    /// A source that counts the values it serves.
    struct Counting<'a> {
        inner: &'a dyn WeightSource,
        values: AtomicUsize,
    }

    impl WeightSource for Counting<'_> {
        fn origin(&self) -> &std::path::Path {
            self.inner.origin()
        }

        fn names(&self) -> Vec<String> {
            self.inner.names()
        }

        fn tensor(&self, name: &str) -> Result<Tensor> {
            let t = self.inner.tensor(name)?;
            self.values.fetch_add(t.elem_count(), Ordering::Relaxed);
            Ok(t)
        }

        fn fingerprint(&self) -> Result<String> {
            self.inner.fingerprint()
        }

        fn tensor_slice(
            &self,
            name: &str,
            shape: &[usize],
            slice: Option<(usize, Range<usize>)>,
            dtype: candle_core::DType,
        ) -> Result<Tensor> {
            let t = self.inner.tensor_slice(name, shape, slice, dtype)?;
            self.values.fetch_add(t.elem_count(), Ordering::Relaxed);
            Ok(t)
        }
    }

    /// `block`'s output at `x` and the gradients of `sum(output · ramp)` at `of`.
    fn run(block: &Block, x: &Tensor, of: &Block) -> (Tensor, Vec<Tensor>) {
        let config = tiny_config();
        let (b, t, _) = x.dims3().unwrap();
        let positions =
            Positions::new(&Window::DENSE, (b, t), &config.positions(), &Device::Cpu).unwrap();
        let tp: Arc<dyn Collective> = Arc::new(SingleRank);
        let y = block
            .forward(x.clone(), &positions, None, &mut NoHooks, &tp)
            .unwrap();
        let ramp = Tensor::arange(0f32, y.elem_count() as f32, &Device::Cpu)
            .unwrap()
            .reshape(y.dims())
            .unwrap()
            .affine(1e-3, 0.0)
            .unwrap();
        let grads = (&y * &ramp).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = of
            .parameters()
            .iter()
            .map(|p| grads.get(&p.value).unwrap().clone())
            .collect();
        (y, grads)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Runs `work` for each member of a group of two replicas, on threads of its own.
    fn on_replicas<T: Send>(work: impl Fn(usize, Arc<dyn Collective>) -> T + Sync) -> Vec<T> {
        let replicas = InProcessCollective::group(2, Arc::new(PassControl::default())).unwrap();
        std::thread::scope(|s| {
            let work = &work;
            let handles: Vec<_> = replicas
                .into_iter()
                .enumerate()
                .map(|(r, member)| s.spawn(move || work(r, Arc::new(member))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn a_gathered_block_computes_as_the_whole_one_and_each_piece_gets_the_replicas_gradient() {
        let checkpoint = tiny_checkpoint(3).unwrap();
        let config = checkpoint.config.as_llama().unwrap();
        let tp = flexmodel_cluster::TpRank::SOLE;
        let weights = HeldWeights::f32(checkpoint.weights.as_ref());
        let block = Block::load(&weights, 1, config, tp).unwrap();
        let inputs: Vec<Tensor> = (0..2)
            .map(|r| Tensor::randn(r as f32, 1f32, (2, 5, config.d_model), &Device::Cpu).unwrap())
            .collect();
        let whole: Vec<(Tensor, Vec<Tensor>)> =
            inputs.iter().map(|x| run(&block, x, &block)).collect();

        let sharded = on_replicas(|r, member| {
            let mut fsdp = Fsdp::new(member);
            let reads = fsdp.reads();
            let held = HeldWeights {
                pieces: Some(&reads),
                ..weights
            };
            let pieces = Block::load(&held, 1, config, tp).unwrap();
            let parameters = pieces.parameters();
            let pieces = fsdp.adopt(pieces, parameters, &reads).unwrap();
            let untracked = fsdp.gathered(false, |f| pieces.map_parameters(f)).unwrap();
            assert!(untracked.parameters().iter().all(|p| !p.value.track_op()));
            let gathered = fsdp.gathered(true, |f| pieces.map_parameters(f)).unwrap();
            let described: Vec<ParamSlice> = pieces
                .parameters()
                .into_iter()
                .map(|p| fsdp.describe(p))
                .collect();
            (run(&gathered, &inputs[r], &pieces), described)
        });
        for (replica, ((y, grads), described)) in sharded.iter().enumerate() {
            assert_eq!(
                max_abs_diff(y, &whole[replica].0),
                0.0,
                "replica {replica}'s output"
            );
            assert_eq!(grads.len(), block.parameters().len());
            for (i, (grad, whole_slice)) in grads.iter().zip(block.parameters()).enumerate() {
                // Row-parallel weights are cut along dimension 1, the others along 0 (of
                // the parameter: a linear layer holds its weight transposed).
                let dim = whole_slice.split.as_ref().map_or(0, |(d, _)| *d);
                let held = whole_slice.held_dim(dim);
                let summed = (&whole[0].1[i] + &whole[1].1[i]).unwrap();
                let rows = split_evenly(summed.dim(held).unwrap(), 2)[replica].clone();
                assert_eq!(described[i].piece, Some((dim, rows.clone())));
                let expected = summed.narrow(held, rows.start, rows.len()).unwrap();
                assert_eq!(grad.dims(), expected.dims());
                let differs = max_abs_diff(grad, &expected);
                assert!(
                    differs < 1e-6,
                    "replica {replica}, parameter {i}: {differs}"
                );
            }
        }
    }

    #[test]
    fn a_model_under_fsdp_gives_the_whole_models_logits_holding_half_its_weights() {
        let checkpoint = tiny_checkpoint(3).unwrap();
        let config = checkpoint.config.as_llama().unwrap();
        let weights = checkpoint.weights.as_ref();
        let tp: Arc<dyn Collective> = Arc::new(SingleRank);
        let model = Llama::load(config, weights, tp.clone()).unwrap();
        let tokens: Vec<Tensor> = (0..2u32)
            .map(|r| {
                let ids: Vec<u32> = (0..12).map(|i| (i * 37 + r * 11) % 256).collect();
                Tensor::from_vec(ids, (2, 6), &Device::Cpu).unwrap()
            })
            .collect();
        let whole: Vec<Tensor> = tokens
            .iter()
            .map(|t| model.forward(t, &mut NoHooks).unwrap())
            .collect();
        let sharded = on_replicas(|r, member| {
            let stage = Stage::whole(config.n_layers);
            let counting = Counting {
                inner: weights,
                values: AtomicUsize::new(0),
            };
            let model =
                Llama::load_stage_fsdp(config, &counting, tp.clone(), stage, &Device::Cpu, member)
                    .unwrap();
            (
                model.forward(&tokens[r], &mut NoHooks).unwrap(),
                model.weight_bytes(),
                counting.values.into_inner(),
            )
        });
        for (replica, (logits, bytes, read)) in sharded.iter().enumerate() {
            assert_eq!(
                max_abs_diff(logits, &whole[replica]),
                0.0,
                "replica {replica}"
            );
            // Every parameter of the tiny model cuts evenly in two; a replica reads
            // only its piece of each.
            assert_eq!(*bytes, model.weight_bytes() / 2);
            assert_eq!(*read * 4, model.weight_bytes() / 2, "replica {replica}");
        }
    }
}
