//! A member of a group whose connections can be replaced between passes.

use std::sync::{Arc, RwLock};

use candle_core::Tensor;

use super::Collective;
use crate::{Error, Result, TpRank};

/// A group member that keeps its place while the group's connections are replaced: a
/// long-running worker holds its model's collective through one, and a new driver (or
/// a replaced peer) brings a new group without the model being loaded again.
pub struct Regroupable {
    rank: TpRank,
    current: RwLock<Arc<dyn Collective>>,
}

impl Regroupable {
    /// A member that computes through `group` until it is replaced.
    pub fn new(group: Arc<dyn Collective>) -> Self {
        Self {
            rank: group.tp_rank(),
            current: RwLock::new(group),
        }
    }

    /// Computes through `group` from now on; it must give this member the same place.
    pub fn replace(&self, group: Arc<dyn Collective>) -> Result<()> {
        if group.tp_rank() != self.rank {
            return Err(Error::Internal("a regrouped member must keep its place"));
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = group;
        Ok(())
    }

    fn current(&self) -> Arc<dyn Collective> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Collective for Regroupable {
    fn tp_rank(&self) -> TpRank {
        self.rank
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.current().all_reduce_sum(x)
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        self.current().all_gather(x, dim)
    }

    fn reduce_scatter_sum(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        self.current().reduce_scatter_sum(x, dim)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.current().broadcast(x, root)
    }

    fn send(&self, x: &Tensor, to: usize) -> Result<()> {
        self.current().send(x, to)
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        self.current().recv(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InProcessCollective, PassControl, SingleRank};

    #[test]
    fn a_regrouped_member_computes_through_its_new_group() {
        let control = Arc::new(PassControl::default());
        let old: Vec<Arc<dyn Collective>> = InProcessCollective::group(2, control.clone())
            .unwrap()
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Collective>)
            .collect();
        let members: Vec<Regroupable> = old.into_iter().map(Regroupable::new).collect();
        let new = InProcessCollective::group(2, control).unwrap();
        for (member, group) in members.iter().zip(new) {
            member.replace(Arc::new(group)).unwrap();
        }
        let sums: Vec<f32> = std::thread::scope(|s| {
            let handles: Vec<_> = members
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    s.spawn(move || {
                        let x = Tensor::new(&[i as f32 + 1.0], &candle_core::Device::Cpu).unwrap();
                        m.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap()[0]
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(sums, [3.0, 3.0]);
    }

    #[test]
    fn a_member_cannot_change_its_place() {
        let control = Arc::new(PassControl::default());
        let mut group = InProcessCollective::group(2, control).unwrap();
        let second = Arc::new(group.pop().unwrap());
        let member = Regroupable::new(Arc::new(group.pop().unwrap()));
        assert!(member.replace(second).is_err());
        assert!(member.replace(Arc::new(SingleRank)).is_err());
    }
}
