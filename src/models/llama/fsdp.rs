//! FSDP: a block's parameters cut into pieces across the data-parallel replicas, and
//! gathered whole just before the block computes.
//!
//! Each parameter (the tensor-parallel slice a rank holds) is cut along dimension 0 as
//! [`split_evenly`] cuts it, replica `r` keeping piece `r`. [`Block::gathered`] joins
//! every replica's pieces through the replicas' collective; the gathered block is
//! dropped when the block is done. In backward, the gather's conjugate sums each
//! piece's gradient over the replicas (a reduce-scatter), so that each replica keeps
//! the gradient of its own piece of the whole batch.

use std::sync::Arc;

use flexmodel_cluster::{Collective, TpRank, conjugate, split_evenly};

use super::block::Block;
use crate::Result;
use crate::models::parallel::{owned_slice, param};

impl Block {
    /// The block holding only `replica`'s piece of each parameter, as new variables.
    pub(crate) fn pieces(&self, replica: TpRank) -> Result<Block> {
        self.map_parameters(&mut |t| {
            let rows = split_evenly(t.dim(0)?, replica.size())[replica.rank()].clone();
            param(owned_slice(t, 0, &rows)?)
        })
    }

    /// The whole block from every replica's [`pieces`](Self::pieces), gathered through
    /// `replicas` (the collective of the replicas holding this shard).
    pub(crate) fn gathered(&self, replicas: &Arc<dyn Collective>) -> Result<Block> {
        self.map_parameters(&mut |piece| Ok(conjugate::gather_pieces(piece, 0, replicas)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use flexmodel_actors::Window;
    use flexmodel_cluster::{InProcessCollective, PassControl, SingleRank};

    use super::*;
    use crate::NoHooks;
    use crate::models::llama::positions::Positions;
    use crate::tiny::{tiny_checkpoint, tiny_config};

    /// `block`'s output at `x` and the gradients of `sum(output · ramp)` at `of`.
    fn run(block: &Block, x: &Tensor, of: &Block) -> (Tensor, Vec<Tensor>) {
        let config = tiny_config();
        let (b, t, _) = x.dims3().unwrap();
        let (dh, theta) = (config.d_head, config.rope_theta);
        let positions = Positions::new(&Window::DENSE, (b, t), dh, theta, &Device::Cpu).unwrap();
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

    #[test]
    fn a_gathered_block_computes_as_the_whole_one_and_each_piece_gets_the_replicas_gradient() {
        let checkpoint = tiny_checkpoint(3).unwrap();
        let config = &checkpoint.config;
        let block = Block::load(checkpoint.weights.as_ref(), 1, config, TpRank::SOLE).unwrap();
        let inputs: Vec<Tensor> = (0..2)
            .map(|r| Tensor::randn(r as f32, 1f32, (2, 5, config.d_model), &Device::Cpu).unwrap())
            .collect();
        let whole: Vec<(Tensor, Vec<Tensor>)> =
            inputs.iter().map(|x| run(&block, x, &block)).collect();

        let replicas = InProcessCollective::group(2, Arc::new(PassControl::default())).unwrap();
        let sharded: Vec<(Tensor, Vec<Tensor>)> = std::thread::scope(|s| {
            let handles: Vec<_> = replicas
                .into_iter()
                .zip(&inputs)
                .map(|(member, x)| {
                    let block = &block;
                    s.spawn(move || {
                        let member: Arc<dyn Collective> = Arc::new(member);
                        let pieces = block.pieces(member.tp_rank()).unwrap();
                        let gathered = pieces.gathered(&member).unwrap();
                        run(&gathered, x, &pieces)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (replica, (y, grads)) in sharded.iter().enumerate() {
            assert_eq!(
                max_abs_diff(y, &whole[replica].0),
                0.0,
                "replica {replica}'s output"
            );
            assert_eq!(grads.len(), block.parameters().len());
            for (i, grad) in grads.iter().enumerate() {
                let summed = (&whole[0].1[i] + &whole[1].1[i]).unwrap();
                let rows = split_evenly(summed.dim(0).unwrap(), 2)[replica].clone();
                let expected = summed.narrow(0, rows.start, rows.len()).unwrap();
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
    fn a_model_under_fsdp_gives_the_whole_models_logits_holding_half_its_blocks() {
        let checkpoint = tiny_checkpoint(3).unwrap();
        let config = &checkpoint.config;
        let tp: Arc<dyn Collective> = Arc::new(SingleRank);
        let model = crate::models::Llama::load(config, checkpoint.weights.as_ref(), tp).unwrap();
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
        let block_bytes: usize = model
            .parameters()
            .iter()
            .filter(|p| p.name.starts_with("model.layers."))
            .map(|p| p.value.elem_count() * 4)
            .sum();

        let replicas = InProcessCollective::group(2, Arc::new(PassControl::default())).unwrap();
        let sharded: Vec<(Tensor, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = replicas
                .into_iter()
                .zip(&tokens)
                .map(|(member, t)| {
                    let model = model.clone();
                    s.spawn(move || {
                        let model = model.with_fsdp(Arc::new(member)).unwrap();
                        (
                            model.forward(t, &mut NoHooks).unwrap(),
                            model.weight_bytes(),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (replica, (logits, bytes)) in sharded.iter().enumerate() {
            assert_eq!(
                max_abs_diff(logits, &whole[replica]),
                0.0,
                "replica {replica}"
            );
            // Every dimension 0 of the tiny model's blocks is even: exactly half.
            assert_eq!(*bytes, model.weight_bytes() - block_bytes / 2);
        }
    }
}
