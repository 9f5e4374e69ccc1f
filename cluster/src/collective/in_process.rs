//! Collectives between threads of one process, over channels.

use std::sync::Arc;

use candle_core::Tensor;
use crossbeam_channel::{Receiver, Sender, unbounded};

use super::algorithms::{self, PointToPoint};
use crate::{Error, PassControl, Result, TpRank};

/// A tensor tagged with the pass that sent it.
type Message = (u64, Tensor);

/// One member of an in-process group: a channel to and from every other member.
pub struct InProcessCollective {
    rank: TpRank,
    to: Vec<Sender<Message>>,
    from: Vec<Receiver<Message>>,
    control: Arc<PassControl>,
}

impl InProcessCollective {
    /// The members `0..size` of a new group.
    pub fn group(size: usize, control: Arc<PassControl>) -> Result<Vec<InProcessCollective>> {
        // channels[i][j] carries messages from member i to member j. Unbounded: a member
        // sends before it receives (all-reduce, pipeline hand-off), and each collective
        // call queues at most one tensor per peer before the peer takes it.
        let channels: Vec<Vec<(Sender<Message>, Receiver<Message>)>> = (0..size)
            .map(|_| (0..size).map(|_| unbounded()).collect())
            .collect();
        (0..size)
            .map(|i| {
                Ok(InProcessCollective {
                    rank: TpRank::new(i, size)?,
                    to: (0..size).map(|j| channels[i][j].0.clone()).collect(),
                    from: (0..size).map(|j| channels[j][i].1.clone()).collect(),
                    control: control.clone(),
                })
            })
            .collect()
    }
}

impl PointToPoint for InProcessCollective {
    fn member(&self) -> TpRank {
        self.rank
    }

    fn send_to(&self, x: &Tensor, to: usize) -> Result<()> {
        algorithms::check_peer(self.rank, to)?;
        self.to[to]
            .send((self.control.pass(), x.clone()))
            .map_err(|_| Error::PeerGone(to))
    }

    fn recv_from(&self, from: usize) -> Result<Tensor> {
        algorithms::check_peer(self.rank, from)?;
        let pass = self.control.pass();
        let wanted = |(sent_in, _): &Message| *sent_in == pass;
        let (_, tensor) = self
            .control
            .receive(&self.from[from], wanted, Error::PeerGone(from))?;
        Ok(tensor)
    }
}
