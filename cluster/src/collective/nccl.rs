//! Collectives between GPU processes through NCCL (cudarc's bindings, the version candle
//! uses).
//!
//! The group's members first join a group over another transport (the job's TCP
//! connections, authenticated by its token); member 0 makes NCCL's unique id and
//! broadcasts it there, so that the id never leaves the job's own connections. Every
//! operation then runs on the member's GPU, on the stream of its candle device.
//!
//! NCCL refuses two members on one GPU, so this cannot run on a machine with one GPU;
//! the conformance suite runs on it where two or more exist (see the README).
//!
//! Unlike the other transports, NCCL does not promise to add in rank order: sums may
//! differ from them in the last bits.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::CudaSlice;
use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::cuda::{CudaStorage, CudaStorageSlice};
use candle_core::{CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::{Collective, Error, Result, TpRank};

/// One member of a group whose members are GPU processes joined by NCCL.
pub struct NcclCollective {
    rank: TpRank,
    comm: Arc<SharedComm>,
    device: Device,
}

/// An NCCL communicator that a member's threads pass between them.
struct SharedComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; a member
// is one rank's, whose collectives run one after another (on its shard's thread, or in
// its backward pass on the same thread).
unsafe impl Send for SharedComm {}
// SAFETY: as above.
unsafe impl Sync for SharedComm {}

fn nccl_error(e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("NCCL: {e:?}"))
}

impl NcclCollective {
    /// Joins the NCCL group of the members of `over` (any other transport with the same
    /// members), each computing on its `device` (a CUDA device); `None` when two members
    /// compute on the same GPU, which NCCL refuses (they keep `over`).
    pub fn over(over: &dyn Collective, device: &Device) -> Result<Option<Self>> {
        let rank = over.tp_rank();
        let cuda = match device {
            Device::Cuda(cuda) => cuda,
            _ => return Err(Error::Cuda("NCCL needs a CUDA device".into())),
        };
        let ordinal = cuda.cuda_stream().context().ordinal() as u32;
        let ordinals: Vec<u32> = over
            .all_gather(&Tensor::new(&[ordinal], &Device::Cpu)?, 0)?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        let mut distinct = ordinals.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() < ordinals.len() {
            return Ok(None);
        }
        let id = match rank.rank() {
            0 => Id::new().map_err(nccl_error)?,
            _ => Id::uninit([0; 128]),
        };
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        let shared = over.broadcast(&Tensor::from_vec(bytes, 128, &Device::Cpu)?, 0)?;
        let shared: Vec<u8> = shared.to_device(&Device::Cpu)?.to_vec1()?;
        let mut internal = [0; 128];
        for (to, from) in internal.iter_mut().zip(shared) {
            *to = from as core::ffi::c_char;
        }
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            rank.rank(),
            rank.size(),
            Id::uninit(internal),
        )
        .map_err(nccl_error)?;
        Ok(Some(Self {
            rank,
            comm: Arc::new(SharedComm(comm)),
            device: device.clone(),
        }))
    }

    /// `x` on this member's GPU, contiguous.
    fn local(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.to_device(&self.device)?.contiguous()?)
    }

    /// Every member's `x` (of the same shape) stacked along a new first dimension.
    fn gather_stacked(&self, x: &Tensor) -> Result<Tensor> {
        let op = Nccl {
            comm: self.comm.clone(),
            kind: Kind::AllGather,
        };
        let gathered = self.local(x)?.flatten_all()?.apply_op1_no_bwd(&op)?;
        let mut shape = vec![self.rank.size()];
        shape.extend_from_slice(x.dims());
        Ok(gathered.reshape(shape)?)
    }

    /// A `[10]` i64 header (dtype code, rank, dims) of `x`, for a receiver that does not
    /// know its shape.
    fn header(x: &Tensor) -> Result<Tensor> {
        if x.rank() > 8 {
            return Err(Error::Cuda(format!(
                "NCCL: a tensor of {} dimensions",
                x.rank()
            )));
        }
        let mut header = vec![0i64; 10];
        header[0] = dtype_code(x.dtype())?;
        header[1] = x.rank() as i64;
        for (slot, &d) in header[2..].iter_mut().zip(x.dims()) {
            *slot = d as i64;
        }
        Ok(Tensor::from_vec(header, 10, &Device::Cpu)?)
    }

    /// A zeroed tensor on this GPU of the dtype and shape `header` describes.
    fn buffer_for(&self, header: &Tensor) -> Result<Tensor> {
        let header: Vec<i64> = header.to_device(&Device::Cpu)?.to_vec1()?;
        let dtype = dtype_of(header[0])?;
        let rank = usize::try_from(header[1]).ok().filter(|&r| r <= 8);
        let rank = rank.ok_or_else(|| Error::Cuda("NCCL: a header with a bad rank".into()))?;
        let dims: Vec<usize> = header[2..2 + rank].iter().map(|&d| d as usize).collect();
        Ok(Tensor::zeros(dims, dtype, &self.device)?)
    }

    /// Runs `kind` on `x` (contiguous, on this GPU).
    fn run(&self, x: &Tensor, kind: Kind) -> Result<Tensor> {
        let op = Nccl {
            comm: self.comm.clone(),
            kind,
        };
        Ok(self.local(x)?.apply_op1_no_bwd(&op)?)
    }
}

impl Collective for NcclCollective {
    fn tp_rank(&self) -> TpRank {
        self.rank
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, Kind::AllReduceSum)
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let stacked = self.gather_stacked(x)?;
        let pieces = (0..self.rank.size())
            .map(|r| stacked.get(r))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&pieces, dim)?)
    }

    fn reduce_scatter_sum(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        // NCCL's reduce-scatter needs equal parts; split_evenly's may differ by one.
        let sum = self.all_reduce_sum(x)?;
        let part = &crate::split_evenly(x.dim(dim)?, self.rank.size())[self.rank.rank()];
        Ok(sum.narrow(dim, part.start, part.len())?.contiguous()?)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.rank.size() {
            return Err(Error::RankOutOfRange {
                rank: root,
                size: self.rank.size(),
            });
        }
        let header = self.run(&Self::header(x)?, Kind::Broadcast(root))?;
        let value = match self.rank.rank() == root {
            true => x.clone(),
            false => self.buffer_for(&header)?,
        };
        self.run(&value, Kind::Broadcast(root))
    }

    fn send(&self, x: &Tensor, to: usize) -> Result<()> {
        check_peer(self.rank, to)?;
        self.run(&Self::header(x)?, Kind::Send(to))?;
        self.run(x, Kind::Send(to))?;
        Ok(())
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        check_peer(self.rank, from)?;
        let header = Tensor::zeros(10, DType::I64, &self.device)?;
        let header = self.run(&header, Kind::Recv(from))?;
        let buffer = self.buffer_for(&header)?;
        self.run(&buffer, Kind::Recv(from))
    }
}

fn check_peer(me: TpRank, peer: usize) -> Result<()> {
    if peer >= me.size() || peer == me.rank() {
        return Err(Error::RankOutOfRange {
            rank: peer,
            size: me.size(),
        });
    }
    Ok(())
}

/// The dtypes that travel, by code.
const DTYPES: [DType; 7] = [
    DType::U8,
    DType::U32,
    DType::I64,
    DType::BF16,
    DType::F16,
    DType::F32,
    DType::F64,
];

fn dtype_code(dtype: DType) -> Result<i64> {
    DTYPES
        .iter()
        .position(|&d| d == dtype)
        .map(|i| i as i64)
        .ok_or_else(|| Error::Cuda(format!("NCCL: dtype {dtype:?} cannot be sent")))
}

fn dtype_of(code: i64) -> Result<DType> {
    usize::try_from(code)
        .ok()
        .and_then(|i| DTYPES.get(i).copied())
        .ok_or_else(|| Error::Cuda(format!("NCCL: unknown dtype code {code}")))
}

/// What an [`Nccl`] op does with its input.
#[derive(Clone, Copy)]
enum Kind {
    /// The sum over the members.
    AllReduceSum,
    /// Every member's input, one after another.
    AllGather,
    /// Member `root`'s input.
    Broadcast(usize),
    /// Sends the input to a member; the output is the input.
    Send(usize),
    /// The tensor a member sends, of the input's shape.
    Recv(usize),
}

/// One NCCL call as a candle op on CUDA storage (no backward: the conjugate ops of
/// `conjugate` give collectives their gradients).
struct Nccl {
    comm: Arc<SharedComm>,
    kind: Kind,
}

impl Nccl {
    fn call<T>(
        &self,
        src: &CudaSlice<T>,
        layout: &Layout,
    ) -> candle_core::Result<(CudaSlice<T>, Shape)>
    where
        T: candle_core::cuda::cudarc::nccl::NcclType
            + candle_core::cuda::cudarc::driver::DeviceRepr
            + candle_core::cuda::cudarc::driver::ValidAsZeroBits,
    {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL needs contiguous tensors")
        };
        let src = src.slice(start..end);
        let stream = self.comm.0.stream();
        let n = end - start;
        let size = self.comm.0.world_size();
        fn fail(e: impl std::fmt::Debug) -> candle_core::Error {
            candle_core::Error::Cuda(format!("NCCL: {e:?}").into())
        }
        let shape = layout.shape().clone();
        match self.kind {
            Kind::AllReduceSum => {
                let mut out = stream.alloc_zeros::<T>(n).map_err(fail)?;
                self.comm
                    .0
                    .all_reduce(&src, &mut out, &ReduceOp::Sum)
                    .map_err(fail)?;
                Ok((out, shape))
            }
            Kind::AllGather => {
                let mut out = stream.alloc_zeros::<T>(n * size).map_err(fail)?;
                self.comm.0.all_gather(&src, &mut out).map_err(fail)?;
                Ok((out, Shape::from(n * size)))
            }
            Kind::Broadcast(root) => {
                let mut out = stream.alloc_zeros::<T>(n).map_err(fail)?;
                let send = (self.comm.0.rank() == root).then_some(&src);
                self.comm
                    .0
                    .broadcast(send, &mut out, root as i32)
                    .map_err(fail)?;
                Ok((out, shape))
            }
            Kind::Send(to) => {
                self.comm.0.send(&src, to as i32).map_err(fail)?;
                let mut out = stream.alloc_zeros::<T>(n).map_err(fail)?;
                stream.memcpy_dtod(&src, &mut out).map_err(fail)?;
                Ok((out, shape))
            }
            Kind::Recv(from) => {
                let mut out = stream.alloc_zeros::<T>(n).map_err(fail)?;
                self.comm.0.recv(&mut out, from as i32).map_err(fail)?;
                Ok((out, shape))
            }
        }
    }
}

impl CustomOp1 for Nccl {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors, not on the CPU")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = storage.device().clone();
        macro_rules! on {
            ($slice:expr, $variant:ident) => {{
                let (out, shape) = self.call($slice, layout)?;
                (
                    CudaStorage {
                        slice: CudaStorageSlice::$variant(out),
                        device,
                    },
                    shape,
                )
            }};
        }
        Ok(match &storage.slice {
            CudaStorageSlice::U8(s) => on!(s, U8),
            CudaStorageSlice::U32(s) => on!(s, U32),
            CudaStorageSlice::I64(s) => on!(s, I64),
            CudaStorageSlice::BF16(s) => on!(s, BF16),
            CudaStorageSlice::F16(s) => on!(s, F16),
            CudaStorageSlice::F32(s) => on!(s, F32),
            CudaStorageSlice::F64(s) => on!(s, F64),
            _ => candle_core::bail!("NCCL: a dtype it cannot send"),
        })
    }
}
