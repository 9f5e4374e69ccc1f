//! How ranks are arranged: data × pipeline × tensor parallel, in Megatron's order.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::{DeviceSpec, Error, Result};

/// The dtype a model's weights are held in (`--model-dtype`). Every rank holds its
/// weights in it; what dtype the products are computed in is the model's choice per
/// device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelDtype {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16: half the memory, f32's range, 8 bits of mantissa.
    Bf16,
    /// IEEE half precision: half the memory, 11 bits of mantissa, a range to 65504.
    F16,
}

impl ModelDtype {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// Whether this is f32, the default.
    pub fn is_f32(&self) -> bool {
        *self == Self::F32
    }

    /// The bytes of one weight.
    pub fn size(self) -> usize {
        self.dtype().size_in_bytes()
    }
}

impl fmt::Display for ModelDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl FromStr for ModelDtype {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(Error::UnknownModelDtype(other.to_string())),
        }
    }
}

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
/// tensor-parallel neighbours are adjacent, pipeline stages are outermost); with FSDP,
/// the replicas of a shard each hold 1/dp of its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "LayoutRecord", into = "LayoutRecord")]
pub struct Layout {
    dp: usize,
    pp: usize,
    tp: usize,
    fsdp: bool,
    model_dtype: ModelDtype,
    device: DeviceSpec,
}

/// A layout as messages and records carry it, checked as [`Layout::new`] checks it.
#[derive(Serialize, Deserialize)]
struct LayoutRecord {
    dp: usize,
    pp: usize,
    tp: usize,
    #[serde(default)]
    fsdp: bool,
    /// Left out for f32, so that records of f32 layouts read as they always did.
    #[serde(default, skip_serializing_if = "ModelDtype::is_f32")]
    model_dtype: ModelDtype,
    /// Left out for the CPU, likewise.
    #[serde(default, skip_serializing_if = "DeviceSpec::is_cpu")]
    device: DeviceSpec,
}

impl TryFrom<LayoutRecord> for Layout {
    type Error = Error;

    fn try_from(r: LayoutRecord) -> Result<Self> {
        Ok(Layout::new(r.dp, r.pp, r.tp)?
            .with_fsdp(r.fsdp)?
            .with_model_dtype(r.model_dtype)
            .with_device(r.device))
    }
}

impl From<Layout> for LayoutRecord {
    fn from(l: Layout) -> Self {
        Self {
            dp: l.dp,
            pp: l.pp,
            tp: l.tp,
            fsdp: l.fsdp,
            model_dtype: l.model_dtype,
            device: l.device,
        }
    }
}

impl Layout {
    /// One rank: the whole model in one shard.
    pub const SINGLE: Layout = Layout {
        dp: 1,
        pp: 1,
        tp: 1,
        fsdp: false,
        model_dtype: ModelDtype::F32,
        device: DeviceSpec::Cpu,
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
        Ok(Self {
            dp,
            pp,
            tp,
            fsdp: false,
            model_dtype: ModelDtype::F32,
            device: DeviceSpec::Cpu,
        })
    }

    /// This layout with FSDP on or off: on, the replicas of each shard hold one piece
    /// each of its parameters and gather them as they compute. FSDP needs at least two
    /// replicas.
    pub fn with_fsdp(self, fsdp: bool) -> Result<Self> {
        if fsdp && self.dp < 2 {
            return Err(Error::FsdpWithoutReplicas { dp: self.dp });
        }
        Ok(Self { fsdp, ..self })
    }

    /// This layout with its ranks holding the weights in `model_dtype`.
    pub fn with_model_dtype(self, model_dtype: ModelDtype) -> Self {
        Self {
            model_dtype,
            ..self
        }
    }

    /// This layout with its ranks computing on `device`.
    pub fn with_device(self, device: DeviceSpec) -> Self {
        Self { device, ..self }
    }

    /// Where the ranks compute.
    pub fn device(&self) -> DeviceSpec {
        self.device
    }

    /// The dtype the ranks hold the weights in.
    pub fn model_dtype(&self) -> ModelDtype {
        self.model_dtype
    }

    /// Whether the replicas shard the parameters (FSDP).
    pub fn fsdp(&self) -> bool {
        self.fsdp
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
        write!(f, "tp={} pp={} dp={}", self.tp, self.pp, self.dp)?;
        if self.fsdp {
            write!(f, " fsdp")?;
        }
        if !self.model_dtype.is_f32() {
            write!(f, " {}", self.model_dtype)?;
        }
        match self.device {
            DeviceSpec::Cpu => Ok(()),
            device => write!(f, " {device}"),
        }
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
    fn fsdp_needs_replicas_and_travels_with_the_layout() {
        let err = Layout::new(1, 2, 2).unwrap().with_fsdp(true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad layout: --fsdp shards parameters across data-parallel replicas, but dp=1; give --dp 2 or more"
        );
        let layout = Layout::new(2, 1, 3).unwrap().with_fsdp(true).unwrap();
        assert_eq!(layout.to_string(), "tp=3 pp=1 dp=2 fsdp");
        let json = serde_json::to_string(&layout).unwrap();
        assert_eq!(json, r#"{"dp":2,"pp":1,"tp":3,"fsdp":true}"#);
        assert_eq!(serde_json::from_str::<Layout>(&json).unwrap(), layout);
        let plain: Layout = serde_json::from_str(r#"{"dp":2,"pp":1,"tp":3}"#).unwrap();
        assert!(!plain.fsdp());
        let bad = serde_json::from_str::<Layout>(r#"{"dp":1,"pp":1,"tp":1,"fsdp":true}"#);
        assert!(bad.unwrap_err().to_string().contains("dp=1"));
    }

    #[test]
    fn the_model_dtype_travels_with_the_layout_and_parses_by_name() {
        let layout = Layout::new(1, 2, 2)
            .unwrap()
            .with_model_dtype(ModelDtype::Bf16);
        assert_eq!(layout.to_string(), "tp=2 pp=2 dp=1 bf16");
        let json = serde_json::to_string(&layout).unwrap();
        assert_eq!(
            json,
            r#"{"dp":1,"pp":2,"tp":2,"fsdp":false,"model_dtype":"bf16"}"#
        );
        assert_eq!(serde_json::from_str::<Layout>(&json).unwrap(), layout);
        assert_ne!(layout, layout.with_model_dtype(ModelDtype::F16));
        assert_eq!("f16".parse::<ModelDtype>().unwrap(), ModelDtype::F16);
        assert_eq!(ModelDtype::Bf16.size(), 2);
        let err = "fp8".parse::<ModelDtype>().unwrap_err().to_string();
        assert_eq!(err, "unknown model dtype \"fp8\" (known: f32, bf16, f16)");
    }

    #[test]
    fn the_device_travels_with_the_layout_and_is_left_out_for_the_cpu() {
        let layout = Layout::new(2, 1, 1)
            .unwrap()
            .with_device(DeviceSpec::Cuda(None));
        assert_eq!(layout.to_string(), "tp=1 pp=1 dp=2 cuda");
        let json = serde_json::to_string(&layout).unwrap();
        assert_eq!(
            json,
            r#"{"dp":2,"pp":1,"tp":1,"fsdp":false,"device":"cuda"}"#
        );
        assert_eq!(serde_json::from_str::<Layout>(&json).unwrap(), layout);
        let cpu = layout.with_device(DeviceSpec::Cpu);
        assert!(!serde_json::to_string(&cpu).unwrap().contains("device"));
        let bad = serde_json::from_str::<Layout>(r#"{"dp":1,"pp":1,"tp":1,"device":"gpu"}"#);
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("unknown device \"gpu\"")
        );
    }

    #[test]
    fn uneven_splits_put_the_extra_first() {
        assert_eq!(split_evenly(3, 2), [0..2, 2..3]);
        assert_eq!(split_evenly(30, 4), [0..8, 8..16, 16..23, 23..30]);
        assert_eq!(split_evenly(2, 3), [0..1, 1..2, 2..2]);
    }
}
