//! How ranks are arranged: data × pipeline × tensor parallel, in Megatron's order.

use std::fmt;
use std::ops::Range;

use crate::{Error, Result};

/// A rank's coordinates in the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RankCoords {
    /// Data-parallel replica.
    pub dp: usize,
    /// Pipeline stage.
    pub pp: usize,
    /// Tensor-parallel rank within the stage.
    pub tp: usize,
}

impl fmt::Display for RankCoords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dp {} pp {} tp {}", self.dp, self.pp, self.tp)
    }
}

/// `dp × pp × tp` ranks numbered `rank = pp_i·(dp·tp) + dp_i·tp + tp_i` (Megatron order:
/// tensor-parallel neighbours are adjacent, pipeline stages are outermost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    dp: usize,
    pp: usize,
    tp: usize,
}

impl Layout {
    /// One rank: the whole model in one shard.
    pub const SINGLE: Layout = Layout {
        dp: 1,
        pp: 1,
        tp: 1,
    };

    /// The most ranks a layout may have: far more than any model here can use, and few
    /// enough that a mistyped layout fails at once instead of starting a million threads.
    pub const MAX_RANKS: usize = 4096;

    /// A layout of `dp` replicas of `pp` stages of `tp` ranks; each must be at least 1,
    /// and there are at most [`MAX_RANKS`](Self::MAX_RANKS) ranks.
    pub fn new(dp: usize, pp: usize, tp: usize) -> Result<Self> {
        for (axis, n) in [("dp", dp), ("pp", pp), ("tp", tp)] {
            if n == 0 {
                return Err(Error::ZeroRanks { axis });
            }
        }
        let world = dp.checked_mul(pp).and_then(|n| n.checked_mul(tp));
        if world.is_none_or(|n| n > Self::MAX_RANKS) {
            return Err(Error::TooManyRanks {
                dp,
                pp,
                tp,
                max: Self::MAX_RANKS,
            });
        }
        Ok(Self { dp, pp, tp })
    }

    /// Data-parallel replicas.
    pub fn dp(&self) -> usize {
        self.dp
    }

    /// Pipeline stages.
    pub fn pp(&self) -> usize {
        self.pp
    }

    /// Tensor-parallel ranks per stage.
    pub fn tp(&self) -> usize {
        self.tp
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.dp * self.pp * self.tp
    }

    /// The rank at `coords`.
    pub fn rank(&self, coords: RankCoords) -> usize {
        coords.pp * (self.dp * self.tp) + coords.dp * self.tp + coords.tp
    }

    /// The coordinates of `rank` (below [`world_size`](Self::world_size)).
    pub fn coords(&self, rank: usize) -> RankCoords {
        RankCoords {
            pp: rank / (self.dp * self.tp),
            dp: rank / self.tp % self.dp,
            tp: rank % self.tp,
        }
    }

    /// Every rank's coordinates, in rank order.
    pub fn all(&self) -> impl Iterator<Item = RankCoords> + '_ {
        (0..self.world_size()).map(|r| self.coords(r))
    }

    /// The ranks of `rank`'s tensor-parallel group (same stage and replica), in tp order.
    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.tp)
            .map(|tp| self.rank(RankCoords { tp, ..c }))
            .collect()
    }

    /// The ranks of `rank`'s pipeline (same replica and tp rank), in stage order.
    pub fn pp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.pp)
            .map(|pp| self.rank(RankCoords { pp, ..c }))
            .collect()
    }

    /// The ranks holding the same shard in every replica, in replica order.
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.dp)
            .map(|dp| self.rank(RankCoords { dp, ..c }))
            .collect()
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tp={} pp={} dp={}", self.tp, self.pp, self.dp)
    }
}

/// `0..n` cut into `parts` contiguous ranges in order, the first `n % parts` one longer.
pub fn split_evenly(n: usize, parts: usize) -> Vec<Range<usize>> {
    let (base, extra) = (n / parts.max(1), n % parts.max(1));
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_follow_megatron_order() {
        let layout = Layout::new(2, 3, 2).unwrap();
        assert_eq!(layout.world_size(), 12);
        assert_eq!(
            layout.coords(0),
            RankCoords {
                dp: 0,
                pp: 0,
                tp: 0
            }
        );
        assert_eq!(
            layout.coords(1),
            RankCoords {
                dp: 0,
                pp: 0,
                tp: 1
            }
        );
        assert_eq!(
            layout.coords(2),
            RankCoords {
                dp: 1,
                pp: 0,
                tp: 0
            }
        );
        assert_eq!(
            layout.coords(4),
            RankCoords {
                dp: 0,
                pp: 1,
                tp: 0
            }
        );
        for rank in 0..12 {
            assert_eq!(layout.rank(layout.coords(rank)), rank);
        }
    }

    #[test]
    fn groups_hold_the_ranks_that_differ_in_one_coordinate() {
        let layout = Layout::new(2, 3, 2).unwrap();
        assert_eq!(layout.tp_group(7), [6, 7]);
        assert_eq!(layout.pp_group(7), [3, 7, 11]);
        assert_eq!(layout.dp_group(7), [5, 7]);
    }

    #[test]
    fn zero_ranks_are_rejected() {
        let err = Layout::new(1, 0, 1).unwrap_err();
        assert_eq!(err.to_string(), "bad layout: pp must be at least 1");
    }

    #[test]
    fn huge_layouts_are_rejected_without_overflow() {
        let err = Layout::new(1_000_000, 1, 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad layout: dp=1000000 pp=1 tp=1 is more than 4096 ranks"
        );
        assert!(matches!(
            Layout::new(usize::MAX, 2, 2),
            Err(Error::TooManyRanks { .. })
        ));
        assert!(Layout::new(16, 16, 16).is_ok());
    }

    #[test]
    fn uneven_splits_put_the_extra_first() {
        assert_eq!(split_evenly(3, 2), [0..2, 2..3]);
        assert_eq!(split_evenly(30, 4), [0..8, 8..16, 16..23, 23..30]);
        assert_eq!(split_evenly(2, 3), [0..1, 1..2, 2..2]);
    }
}
