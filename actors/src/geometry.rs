//! Where the pieces of a hook point live, and what each shard does with its piece.

use std::ops::Range;

use candle_core::Tensor;

use crate::Result;

/// How a hook point (or the model's output) is laid out across the ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointGeometry {
    /// Its name, for errors.
    pub name: String,
    /// The pipeline stage that computes it.
    pub stage: usize,
    /// `None` if every tensor-parallel rank holds the whole tensor; otherwise the split
    /// dimension and the range each tensor-parallel rank holds along it (ranks holding
    /// the same range hold copies, e.g. replicated key/value heads).
    pub split: Option<(usize, Vec<Range<usize>>)>,
}

/// How the driver hooks a point in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PointMode {
    /// Not hooked.
    Off,
    /// Gathered for capture; the shards do not wait.
    Observe,
    /// Gathered, edited once, and scattered back; the shards wait for it.
    Edit,
}

/// What one shard does with its piece of a hook point in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ShardAction {
    /// The point is not hooked (or not on this shard's stage).
    Skip,
    /// Send the piece to the coordinator and go on (capture without edit).
    Send,
    /// Send the piece, then continue with the edited piece sent back.
    SendAndWait,
    /// Send nothing (another rank sends this copy) and continue with the edited piece.
    Wait,
}

impl PointGeometry {
    /// Whether tensor-parallel rank `tp` sends its piece: the first rank of each
    /// distinct range (rank 0 alone for a replicated point).
    pub fn sends(&self, tp: usize) -> bool {
        match &self.split {
            None => tp == 0,
            Some((_, ranges)) => !ranges[..tp].contains(&ranges[tp]),
        }
    }

    /// Whether tensor-parallel rank `tp` sends its piece of the gradient: every rank of a
    /// split point (copies of a range each hold part of the gradient), rank 0 of a
    /// replicated point (whose gradient every rank holds whole).
    pub fn sends_gradient(&self, tp: usize) -> bool {
        self.split.is_some() || tp == 0
    }

    /// The action of tensor-parallel rank `tp` of this point's stage.
    pub fn action(&self, tp: usize, edit: bool) -> ShardAction {
        match (self.sends(tp), edit) {
            (true, false) => ShardAction::Send,
            (true, true) => ShardAction::SendAndWait,
            (false, true) => ShardAction::Wait,
            (false, false) => ShardAction::Skip,
        }
    }

    /// The full tensor from the sent pieces: `pieces[dp][tp]` (`None` for ranks that do
    /// not send), tensor-parallel pieces joined along the split dimension, replicas
    /// joined along the batch.
    pub fn assemble(&self, pieces: &[Vec<Option<Tensor>>]) -> Result<Tensor> {
        let pieces = &on_one_device(pieces)?;
        let replicas = pieces
            .iter()
            .map(|row| {
                let sent: Vec<&Tensor> = row.iter().flatten().collect();
                match &self.split {
                    Some((dim, _)) if sent.len() > 1 => Ok(Tensor::cat(&sent, *dim)?),
                    _ => Ok(sent[0].clone()),
                }
            })
            .collect::<Result<Vec<Tensor>>>()?;
        if replicas.len() == 1 {
            return Ok(replicas[0].clone());
        }
        Ok(Tensor::cat(&replicas, 0)?)
    }

    /// The full gradient from the pieces of every sending rank (`pieces[dp][tp]`): the
    /// copies of a range are summed, then assembled like a value.
    pub fn assemble_gradient(&self, pieces: &[Vec<Option<Tensor>>]) -> Result<Tensor> {
        let Some((_, ranges)) = &self.split else {
            return self.assemble(pieces);
        };
        let summed = on_one_device(pieces)?
            .iter()
            .map(|row| {
                let mut out: Vec<Option<Tensor>> = vec![None; row.len()];
                for (tp, piece) in row.iter().enumerate() {
                    let Some(piece) = piece else { continue };
                    let first = ranges.iter().position(|r| *r == ranges[tp]).unwrap_or(tp);
                    out[first] = Some(match out[first].take() {
                        Some(sum) => (sum + piece)?,
                        None => piece.clone(),
                    });
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()?;
        self.assemble(&summed)
    }

    /// The piece of `full` that tensor-parallel rank `tp` of replica `batch` holds.
    pub fn piece(&self, full: &Tensor, batch: &Range<usize>, tp: usize) -> Result<Tensor> {
        let mine = full.narrow(0, batch.start, batch.len())?;
        let mine = match &self.split {
            None => mine,
            Some((dim, ranges)) => mine.narrow(*dim, ranges[tp].start, ranges[tp].len())?,
        };
        Ok(mine.contiguous()?)
    }
}

/// `pieces` on the device of the first: ranks of one process may compute on different
/// GPUs.
fn on_one_device(pieces: &[Vec<Option<Tensor>>]) -> Result<Vec<Vec<Option<Tensor>>>> {
    let Some(device) = pieces
        .iter()
        .flatten()
        .flatten()
        .next()
        .map(|t| t.device().clone())
    else {
        return Ok(pieces.to_vec());
    };
    pieces
        .iter()
        .map(|row| {
            row.iter()
                .map(|p| p.as_ref().map(|t| t.to_device(&device)).transpose())
                .collect::<candle_core::Result<Vec<_>>>()
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn geometry(split: Option<(usize, Vec<Range<usize>>)>) -> PointGeometry {
        PointGeometry {
            name: "p".into(),
            stage: 0,
            split,
        }
    }

    #[test]
    fn copies_are_sent_once() {
        let kv = geometry(Some((1, vec![0..1, 0..1, 1..2, 1..2])));
        assert_eq!(
            (0..4).map(|tp| kv.sends(tp)).collect::<Vec<_>>(),
            [true, false, true, false]
        );
        assert_eq!(kv.action(1, true), ShardAction::Wait);
        let replicated = geometry(None);
        assert_eq!(replicated.action(0, false), ShardAction::Send);
        assert_eq!(replicated.action(2, false), ShardAction::Skip);
    }

    #[test]
    fn pieces_assemble_and_split_back() {
        let full = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 8))
            .unwrap();
        let g = geometry(Some((1, vec![0..4, 4..8])));
        let batches = [0..2, 2..3];
        let pieces: Vec<Vec<Option<Tensor>>> = batches
            .iter()
            .map(|b| {
                (0..2)
                    .map(|tp| Some(g.piece(&full, b, tp).unwrap()))
                    .collect()
            })
            .collect();
        assert_eq!(pieces[1][1].as_ref().unwrap().dims(), [1, 4]);
        let back = g.assemble(&pieces).unwrap();
        assert_eq!(
            back.to_vec2::<f32>().unwrap(),
            full.to_vec2::<f32>().unwrap()
        );
    }
}
