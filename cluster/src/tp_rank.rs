//! A rank's place in its tensor-parallel group.

use std::ops::Range;

use crate::{Error, Result};

/// The position of one shard in its tensor-parallel group: `rank` of `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TpRank {
    rank: usize,
    size: usize,
}

impl TpRank {
    /// The only rank of a group of one: the whole model in one shard.
    pub const SOLE: TpRank = TpRank { rank: 0, size: 1 };

    /// Rank `rank` of a group of `size`.
    pub fn new(rank: usize, size: usize) -> Result<Self> {
        if rank >= size {
            return Err(Error::RankOutOfRange { rank, size });
        }
        Ok(Self { rank, size })
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The part of `0..len` that this rank owns when `what` is split evenly.
    pub fn slice_of(&self, what: &str, len: usize) -> Result<Range<usize>> {
        if !len.is_multiple_of(self.size) {
            return Err(Error::UnevenSplit {
                what: what.to_string(),
                size: len,
                parts: self.size,
            });
        }
        let part = len / self.size;
        Ok(self.rank * part..(self.rank + 1) * part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_range_in_rank_order() {
        let slices: Vec<_> = (0..3)
            .map(|r| TpRank::new(r, 3).unwrap().slice_of("d", 9).unwrap())
            .collect();
        assert_eq!(slices, vec![0..3, 3..6, 6..9]);
    }

    #[test]
    fn uneven_split_names_what_was_split() {
        let err = TpRank::new(0, 2)
            .unwrap()
            .slice_of("n_heads", 9)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "n_heads = 9 cannot be split across 2 tensor-parallel ranks"
        );
    }

    #[test]
    fn rank_must_lie_inside_its_group() {
        assert!(TpRank::new(3, 3).is_err());
    }
}
