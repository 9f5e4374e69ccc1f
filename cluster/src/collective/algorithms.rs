//! Collectives built from point-to-point sends and receives, shared by every transport
//! that has only those (threads over channels, processes over TCP).

use candle_core::Tensor;

use crate::{Collective, Error, Result, TpRank, split_evenly};

impl<T: PointToPoint> Collective for T {
    fn tp_rank(&self) -> TpRank {
        self.member()
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        ring_all_reduce_sum(self, x)
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        all_gather(self, x, dim)
    }

    fn reduce_scatter_sum(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        reduce_scatter_sum(self, x, dim)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        broadcast(self, x, root)
    }

    fn send(&self, x: &Tensor, to: usize) -> Result<()> {
        self.send_to(x, to)
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        self.recv_from(from)
    }
}

/// Sending to and receiving from one member of a group at a time. A send never waits
/// for the receiver; a receive waits for the next tensor from that member in this pass.
/// A transport that has only these gets every [`Collective`] from them.
pub trait PointToPoint: Send + Sync {
    /// This member's place in the group.
    fn member(&self) -> TpRank;
    /// Sends `x` to member `to`.
    fn send_to(&self, x: &Tensor, to: usize) -> Result<()>;
    /// The next tensor from member `from`.
    fn recv_from(&self, from: usize) -> Result<Tensor>;
}

/// Whether `peer` is another member of `me`'s group.
pub(crate) fn check_peer(me: TpRank, peer: usize) -> Result<()> {
    if peer >= me.size() || peer == me.rank() {
        return Err(Error::RankOutOfRange {
            rank: peer,
            size: me.size(),
        });
    }
    Ok(())
}

/// The next tensor from member `from`, on the device of `like`: members of a group of
/// threads may compute on different GPUs, and members of a group of processes receive
/// on the host.
fn recv_onto(p: &impl PointToPoint, from: usize, like: &Tensor) -> Result<Tensor> {
    Ok(p.recv_from(from)?.to_device(like.device())?)
}

/// The ring all-reduce: `n − 1` steps of reduce-scatter, then `n − 1` of all-gather,
/// each moving one `1/n` chunk to the next member. Every member sends and receives
/// `2 (n − 1) / n` of the tensor, and every member ends with the same bits (each chunk
/// is summed on one member and copied to the others).
pub(crate) fn ring_all_reduce_sum(p: &impl PointToPoint, x: &Tensor) -> Result<Tensor> {
    let (me, n) = (p.member().rank(), p.member().size());
    if n == 1 {
        return Ok(x.clone());
    }
    let flat = x.flatten_all()?;
    let mut chunks = split_evenly(flat.elem_count(), n)
        .into_iter()
        .map(|r| Ok(flat.narrow(0, r.start, r.len())?))
        .collect::<Result<Vec<Tensor>>>()?;
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    for step in 0..n - 1 {
        let send = (me + n - step) % n;
        let add = (me + 2 * n - step - 1) % n;
        p.send_to(&chunks[send], next)?;
        chunks[add] = (&chunks[add] + recv_onto(p, prev, x)?)?;
    }
    // Chunk me + 1 is complete here; pass the complete chunks around.
    for step in 0..n - 1 {
        let send = (me + 1 + n - step) % n;
        let take = (me + n - step) % n;
        p.send_to(&chunks[send], next)?;
        chunks[take] = recv_onto(p, prev, x)?;
    }
    Ok(Tensor::cat(&chunks, 0)?.reshape(x.shape())?)
}

/// Every member's `x` concatenated along `dim` in member order.
pub(crate) fn all_gather(p: &impl PointToPoint, x: &Tensor, dim: usize) -> Result<Tensor> {
    let (me, n) = (p.member().rank(), p.member().size());
    for peer in (0..n).filter(|&q| q != me) {
        p.send_to(x, peer)?;
    }
    let pieces = (0..n)
        .map(|peer| match peer == me {
            true => Ok(x.clone()),
            false => recv_onto(p, peer, x),
        })
        .collect::<Result<Vec<Tensor>>>()?;
    Ok(Tensor::cat(&pieces, dim)?)
}

/// This member's part along `dim` of the sum of every member's `x`: each member sends
/// every other its part, then adds the parts it has, in rank order.
pub(crate) fn reduce_scatter_sum(p: &impl PointToPoint, x: &Tensor, dim: usize) -> Result<Tensor> {
    let (me, n) = (p.member().rank(), p.member().size());
    let parts = split_evenly(x.dim(dim)?, n);
    let part = |of: usize| -> Result<Tensor> {
        let rows = &parts[of];
        Ok(x.narrow(dim, rows.start, rows.len())?.contiguous()?)
    };
    for peer in (0..n).filter(|&q| q != me) {
        p.send_to(&part(peer)?, peer)?;
    }
    let mut sum: Option<Tensor> = None;
    for member in 0..n {
        let addend = match member == me {
            true => part(me)?,
            false => recv_onto(p, member, x)?,
        };
        sum = Some(match sum {
            Some(s) => (s + addend)?,
            None => addend,
        });
    }
    // A copy of its own, so that the part does not keep the whole `x` alive.
    Ok(sum
        .ok_or(Error::Internal("a group without members"))?
        .force_contiguous()?)
}

/// `root`'s `x` on every member.
pub(crate) fn broadcast(p: &impl PointToPoint, x: &Tensor, root: usize) -> Result<Tensor> {
    let (me, n) = (p.member().rank(), p.member().size());
    if root >= n {
        return Err(Error::RankOutOfRange {
            rank: root,
            size: n,
        });
    }
    if me != root {
        return recv_onto(p, root, x);
    }
    for peer in (0..n).filter(|&q| q != me) {
        p.send_to(x, peer)?;
    }
    Ok(x.clone())
}
