//! Collectives between processes, over framed TCP connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

use super::algorithms::{self, PointToPoint};
use crate::transport::{Connection, Frame, FrameKind, Hello, Hub};
use crate::{Error, PassControl, Result, TpRank};

/// One member of a group whose members are processes: a TCP connection to every other
/// member. A connection that ends fails every later operation with that member with
/// [`Error::PeerGone`], or [`Error::Tampered`] if a frame on it failed its check.
pub struct TcpCollective {
    rank: TpRank,
    /// By member; `None` for this member.
    peers: Vec<Option<Connection>>,
    control: Arc<PassControl>,
}

impl TcpCollective {
    /// Joins group `group` as member `rank`: dials every member before it (at
    /// `addresses[j]`, their hubs) and accepts every member after it on `hub`, until
    /// `deadline`.
    pub fn connect(
        group: &str,
        rank: TpRank,
        addresses: &[SocketAddr],
        hub: &Hub,
        control: Arc<PassControl>,
        deadline: Instant,
    ) -> Result<Self> {
        let me = rank.rank();
        let hello = Hello {
            group: group.to_string(),
            member: me,
        };
        let mut peers: Vec<Option<Connection>> = (0..rank.size()).map(|_| None).collect();
        for (j, peer) in peers.iter_mut().enumerate().take(me) {
            let timeout = deadline.saturating_duration_since(Instant::now());
            let address = *addresses.get(j).ok_or(Error::RankOutOfRange {
                rank: j,
                size: addresses.len(),
            })?;
            *peer = Some(hub.dial(address, &hello, timeout)?);
        }
        for (j, peer) in peers.iter_mut().enumerate().skip(me + 1) {
            let from = Hello {
                group: group.to_string(),
                member: j,
            };
            *peer = Some(hub.accept(&from, deadline)?);
        }
        Ok(Self {
            rank,
            peers,
            control,
        })
    }

    fn peer(&self, member: usize) -> Result<&Connection> {
        algorithms::check_peer(self.rank, member)?;
        self.peers[member].as_ref().ok_or(Error::Internal(
            "a group member has no connection to another",
        ))
    }

    /// The error of an operation with `member` whose connection ended.
    fn gone(&self, member: usize) -> Error {
        match self.peers[member].as_ref() {
            Some(connection) if connection.tampering().is_some() => connection.ended(),
            _ => Error::PeerGone(member),
        }
    }
}

impl PointToPoint for TcpCollective {
    fn member(&self) -> TpRank {
        self.rank
    }

    fn send_to(&self, x: &Tensor, to: usize) -> Result<()> {
        let frame = Frame::tensor(FrameKind::Collective, self.control.pass(), 0, 0, x)?;
        self.peer(to)?.send(frame).map_err(|_| self.gone(to))
    }

    fn recv_from(&self, from: usize) -> Result<Tensor> {
        let pass = self.control.pass();
        let wanted = |f: &Frame| f.pass == pass && f.kind == FrameKind::Collective;
        let frame = self
            .control
            .receive(self.peer(from)?.inbox(), wanted, Error::PeerGone(from))
            .map_err(|e| match e {
                Error::PeerGone(_) => self.gone(from),
                e => e,
            })?;
        Ok(frame.to_tensor()?)
    }
}
