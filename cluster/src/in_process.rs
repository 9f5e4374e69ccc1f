//! Collectives between threads of one process, over channels.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use candle_core::Tensor;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};

use crate::{Collective, Error, Result, TpRank};

/// The pass the ranks of a runtime are in, and whether it was aborted. Shared by every
/// collective of the runtime; the driver starts each pass and aborts a failing one.
#[derive(Debug, Default)]
pub struct PassControl {
    pass: AtomicU64,
    aborted: AtomicBool,
}

impl PassControl {
    /// How often a blocked receive checks whether the pass was aborted.
    pub const ABORT_POLL: Duration = Duration::from_millis(20);

    /// The first message from `from` that `wanted` accepts, dropping the others (stale
    /// messages of earlier passes); [`Error::Aborted`] once the pass is aborted, `gone`
    /// when every sender is gone.
    pub fn receive<T>(
        &self,
        from: &Receiver<T>,
        wanted: impl Fn(&T) -> bool,
        gone: Error,
    ) -> Result<T> {
        loop {
            match from.recv_timeout(Self::ABORT_POLL) {
                Ok(message) if wanted(&message) => return Ok(message),
                Ok(_stale) => continue,
                Err(RecvTimeoutError::Timeout) if self.aborted() => return Err(Error::Aborted),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Err(gone),
            }
        }
    }

    /// Starts pass `pass`: messages of earlier passes are dropped on receipt.
    pub fn begin(&self, pass: u64) {
        self.pass.store(pass, Ordering::SeqCst);
        self.aborted.store(false, Ordering::SeqCst);
    }

    /// Makes every blocked or later receive of this pass fail with [`Error::Aborted`].
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }

    /// The current pass.
    pub fn pass(&self) -> u64 {
        self.pass.load(Ordering::SeqCst)
    }

    /// Whether the current pass was aborted.
    pub fn aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

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

    /// Every member's `x` in rank order (this member's own without a copy).
    fn exchange(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let me = self.rank.rank();
        for peer in (0..self.rank.size()).filter(|&p| p != me) {
            self.send(x, peer)?;
        }
        (0..self.rank.size())
            .map(|peer| {
                if peer == me {
                    Ok(x.clone())
                } else {
                    self.recv(peer)
                }
            })
            .collect()
    }

    fn check(&self, peer: usize) -> Result<()> {
        if peer >= self.rank.size() || peer == self.rank.rank() {
            return Err(Error::RankOutOfRange {
                rank: peer,
                size: self.rank.size(),
            });
        }
        Ok(())
    }
}

impl Collective for InProcessCollective {
    fn tp_rank(&self) -> TpRank {
        self.rank
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let pieces = self.exchange(x)?;
        let mut sum = pieces[0].clone();
        for piece in &pieces[1..] {
            sum = (sum + piece)?;
        }
        Ok(sum)
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        Ok(Tensor::cat(&self.exchange(x)?, dim)?)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let me = self.rank.rank();
        if me != root {
            return self.recv(root);
        }
        for peer in (0..self.rank.size()).filter(|&p| p != me) {
            self.send(x, peer)?;
        }
        Ok(x.clone())
    }

    fn send(&self, x: &Tensor, to: usize) -> Result<()> {
        self.check(to)?;
        self.to[to]
            .send((self.control.pass(), x.clone()))
            .map_err(|_| Error::PeerGone(to))
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        self.check(from)?;
        let pass = self.control.pass();
        let wanted = |(sent_in, _): &Message| *sent_in == pass;
        let (_, tensor) = self
            .control
            .receive(&self.from[from], wanted, Error::PeerGone(from))?;
        Ok(tensor)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn on_threads<T: Send + 'static>(
        size: usize,
        work: impl Fn(InProcessCollective) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let control = Arc::new(PassControl::default());
        let work = Arc::new(work);
        let handles: Vec<_> = InProcessCollective::group(size, control)
            .unwrap()
            .into_iter()
            .map(|c| {
                let work = work.clone();
                std::thread::spawn(move || work(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn value(rank: usize) -> Tensor {
        Tensor::new(&[rank as f32, 10.0 * rank as f32], &Device::Cpu).unwrap()
    }

    #[test]
    fn all_reduce_gives_every_member_the_sum() {
        let sums = on_threads(3, |c| {
            c.all_reduce_sum(&value(c.tp_rank().rank()))
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        });
        assert_eq!(sums, vec![vec![3.0, 30.0]; 3]);
    }

    #[test]
    fn all_gather_concatenates_in_rank_order() {
        let gathered = on_threads(3, |c| {
            c.all_gather(&value(c.tp_rank().rank()), 0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        });
        assert_eq!(gathered, vec![vec![0.0, 0.0, 1.0, 10.0, 2.0, 20.0]; 3]);
    }

    #[test]
    fn broadcast_copies_the_root() {
        let got = on_threads(3, |c| {
            c.broadcast(&value(c.tp_rank().rank()), 2)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        });
        assert_eq!(got, vec![vec![2.0, 20.0]; 3]);
    }

    #[test]
    fn send_and_recv_pass_along_a_pipeline() {
        let got = on_threads(3, |c| {
            let me = c.tp_rank().rank();
            let x = if me == 0 {
                value(1)
            } else {
                c.recv(me - 1).unwrap()
            };
            let x = (x * 2.0).unwrap();
            if me < 2 {
                c.send(&x, me + 1).unwrap();
            }
            x.to_vec1::<f32>().unwrap()
        });
        assert_eq!(got[2], [8.0, 80.0]);
    }

    #[test]
    fn an_aborted_pass_unblocks_receivers() {
        let control = Arc::new(PassControl::default());
        let mut members = InProcessCollective::group(2, control.clone()).unwrap();
        let silent = members.pop().unwrap();
        let waiter = std::thread::spawn({
            let c = members.pop().unwrap();
            move || c.recv(1)
        });
        std::thread::sleep(Duration::from_millis(50));
        control.abort();
        assert!(matches!(waiter.join().unwrap(), Err(Error::Aborted)));
        drop(silent);
    }

    #[test]
    fn a_vanished_peer_is_an_error_not_a_hang() {
        let control = Arc::new(PassControl::default());
        let mut members = InProcessCollective::group(2, control).unwrap();
        drop(members.pop());
        assert!(matches!(members[0].recv(1), Err(Error::PeerGone(1))));
    }

    #[test]
    fn messages_of_an_earlier_pass_are_dropped() {
        let control = Arc::new(PassControl::default());
        let mut members = InProcessCollective::group(2, control.clone()).unwrap();
        let (b, a) = (members.pop().unwrap(), members.pop().unwrap());
        control.begin(1);
        a.send(&value(1), 1).unwrap();
        control.begin(2);
        a.send(&value(2), 1).unwrap();
        assert_eq!(b.recv(0).unwrap().to_vec1::<f32>().unwrap(), [2.0, 20.0]);
    }
}
