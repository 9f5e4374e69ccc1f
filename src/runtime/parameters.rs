//! Parameters read back whole: the slices every rank holds, joined across FSDP pieces,
//! tensor-parallel ranks and pipeline stages; gradients summed where ranks hold parts
//! of them.

use std::collections::BTreeSet;

use candle_core::Tensor;
use flexmodel_actors::ShardParameters;
use flexmodel_cluster::host_copy::to_host;
use flexmodel_cluster::{Layout, ParamSlice, RankCoords};

use crate::hooks::nearest;
use crate::{Error, Result};

/// Every rank's parameter slices with their gradients, in rank order.
pub(crate) type RankSlices = Vec<ShardParameters>;

/// One rank's slice of a parameter: its tensor-parallel rank, the slice, its gradient.
type Held = (usize, ParamSlice, Option<Tensor>);

/// The names of every parameter, sorted.
pub(crate) fn names(slices: &RankSlices) -> Vec<String> {
    let names: BTreeSet<&str> = slices
        .iter()
        .flatten()
        .map(|(p, _)| p.name.as_str())
        .collect();
    names.into_iter().map(str::to_string).collect()
}

/// The whole value of parameter `name` and, when every rank has one, its whole gradient.
///
/// Under FSDP the replicas' pieces of each slice are joined first, and their gradients
/// are already summed over the replicas. Otherwise the value comes from the first
/// replica and the gradient is summed over replicas (each saw part of the batch). Both
/// are summed over stages (a tied embedding is used by the first and the last stage).
pub(crate) fn gather(
    name: &str,
    layout: &Layout,
    slices: &RankSlices,
) -> Result<(Tensor, Option<Tensor>)> {
    // Each slice laid out as the parameter is (a linear layer's weight is held transposed).
    let mut held: Vec<(RankCoords, ParamSlice, Option<Tensor>)> = Vec::new();
    for (rank, of_rank) in slices.iter().enumerate() {
        let c = layout.coords(rank);
        for (p, g) in of_rank.iter().filter(|(p, _)| p.name == name) {
            let (mut p, g) = p.clone().presented(g.clone())?;
            // Joined on the host: the slices may be on different GPUs.
            p.value = to_host(&p.value)?;
            let g = g.as_ref().map(to_host).transpose()?;
            held.push((c, p, g));
        }
    }
    if held.is_empty() {
        let all = names(slices);
        return Err(Error::UnknownParameter {
            name: name.to_string(),
            suggestions: nearest(name, all.iter().map(String::as_str), 3),
        });
    }
    let held = match held.iter().any(|(_, p, _)| p.piece.is_some()) {
        true => join_pieces(held)?,
        false => held,
    };
    // Per (replica, stage): the tensor-parallel slices of `name`.
    let mut groups: Vec<((usize, usize), Vec<Held>)> = Vec::new();
    for (c, p, g) in held {
        match groups.iter_mut().find(|(key, _)| *key == (c.dp, c.pp)) {
            Some((_, group)) => group.push((c.tp, p, g)),
            None => groups.push(((c.dp, c.pp), vec![(c.tp, p, g)])),
        }
    }
    groups.sort_by_key(|(key, _)| *key);
    let value = join(&groups[0].1, |(_, p, _)| Some(p.value.clone()), false)?;
    let mut grad: Option<Tensor> = None;
    for (_, group) in &groups {
        let Some(part) = join_gradient(group)? else {
            return Ok((value, None));
        };
        grad = Some(match grad {
            Some(sum) => (sum + part)?,
            None => part,
        });
    }
    Ok((value, grad))
}

/// The FSDP pieces of each (stage, tensor-parallel rank)'s slice joined into the slice,
/// as replica 0's; a gradient where every piece has one.
fn join_pieces(
    mut held: Vec<(RankCoords, ParamSlice, Option<Tensor>)>,
) -> Result<Vec<(RankCoords, ParamSlice, Option<Tensor>)>> {
    let start = |p: &ParamSlice| p.piece.as_ref().map(|(_, r)| r.start);
    held.sort_by_key(|(c, p, _)| (c.pp, c.tp, start(p)));
    let mut joined = Vec::new();
    for slice in held.chunk_by(|(a, _, _), (b, _, _)| (a.pp, a.tp) == (b.pp, b.tp)) {
        let (coords, first, _) = &slice[0];
        let Some((dim, _)) = first.piece.clone() else {
            return Err(Error::Internal(
                "a parameter cut into pieces on some ranks only",
            ));
        };
        let values: Vec<Tensor> = slice.iter().map(|(_, p, _)| p.value.clone()).collect();
        let grads: Option<Vec<Tensor>> = slice.iter().map(|(_, _, g)| g.clone()).collect();
        let whole = ParamSlice {
            value: Tensor::cat(&values, dim)?,
            piece: None,
            ..first.clone()
        };
        let grad = grads.map(|g| Tensor::cat(&g, dim)).transpose()?;
        joined.push((RankCoords { dp: 0, ..*coords }, whole, grad));
    }
    Ok(joined)
}

fn join_gradient(group: &[Held]) -> Result<Option<Tensor>> {
    if group.iter().any(|(_, _, g)| g.is_none()) {
        return Ok(None);
    }
    Ok(Some(join(group, |(_, _, g)| g.clone(), true)?))
}

/// Joins the tensor-parallel slices of one parameter along their split dimension, in
/// range order; slices of the same range are copies: the first is taken, or with `sum`
/// (gradients, each copy holding part) they are added. A parameter every rank holds
/// whole is taken from the first rank.
fn join(group: &[Held], tensor: impl Fn(&Held) -> Option<Tensor>, sum: bool) -> Result<Tensor> {
    let mut ordered: Vec<&Held> = group.iter().collect();
    ordered.sort_by_key(|(tp, p, _)| (p.split.as_ref().map(|(_, r)| r.start), *tp));
    let missing = || Error::Internal("a parameter slice has no tensor");
    let Some((dim, _)) = ordered[0].1.split.clone() else {
        return tensor(ordered[0]).ok_or_else(missing);
    };
    let mut pieces: Vec<(std::ops::Range<usize>, Tensor)> = Vec::new();
    for entry in ordered {
        let range = entry.1.split.clone().map(|(_, r)| r).unwrap_or_default();
        let t = tensor(entry).ok_or_else(missing)?;
        match pieces.last_mut() {
            Some((last, acc)) if *last == range => {
                if sum {
                    *acc = (&*acc + t)?;
                }
            }
            _ => pieces.push((range, t)),
        }
    }
    let tensors: Vec<Tensor> = pieces.into_iter().map(|(_, t)| t).collect();
    Ok(Tensor::cat(&tensors, dim)?)
}
