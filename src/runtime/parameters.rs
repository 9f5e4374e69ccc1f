//! Parameters read back whole: the slices every rank holds, joined across tensor-parallel
//! ranks and pipeline stages; gradients summed where ranks hold parts of them.

use std::collections::BTreeSet;

use candle_core::Tensor;
use flexmodel_actors::ShardParameters;
use flexmodel_cluster::Layout;
use flexmodel_cluster::ParamSlice;

use crate::hooks::nearest;
use crate::{Error, Result};

/// Every rank's parameter slices with their gradients, in rank order.
pub(crate) type RankSlices = Vec<ShardParameters>;

/// One rank's slice of a parameter: its tensor-parallel rank, the slice, its gradient.
type Held<'a> = (usize, &'a ParamSlice, &'a Option<Tensor>);

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
/// The value comes from the first replica's first stage that holds it; the gradient is
/// summed over replicas (each saw part of the batch) and over stages (a tied embedding
/// is used by the first and the last stage).
pub(crate) fn gather(
    name: &str,
    layout: &Layout,
    slices: &RankSlices,
) -> Result<(Tensor, Option<Tensor>)> {
    // Per (replica, stage): the tensor-parallel slices of `name`.
    let mut groups: Vec<((usize, usize), Vec<Held>)> = Vec::new();
    for (rank, held) in slices.iter().enumerate() {
        let c = layout.coords(rank);
        for (p, g) in held.iter().filter(|(p, _)| p.name == name) {
            match groups.iter_mut().find(|(key, _)| *key == (c.dp, c.pp)) {
                Some((_, group)) => group.push((c.tp, p, g)),
                None => groups.push(((c.dp, c.pp), vec![(c.tp, p, g)])),
            }
        }
    }
    if groups.is_empty() {
        let all = names(slices);
        return Err(Error::UnknownParameter {
            name: name.to_string(),
            suggestions: nearest(name, all.iter().map(String::as_str), 3),
        });
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

fn join_gradient(group: &[Held]) -> Result<Option<Tensor>> {
    if group.iter().any(|(_, _, g)| g.is_none()) {
        return Ok(None);
    }
    Ok(Some(join(group, |(_, _, g)| (*g).clone(), true)?))
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
