//! Copies of device tensors to the host, for the driver: hook pieces, captures, logits
//! and frames.
//!
//! A CUDA tensor is copied into a reused page-locked (pinned) buffer on a copy stream of
//! its own, which waits only for the work that produced the tensor: the model's stream
//! goes on with the next layers while the copy runs, and the thread that asked waits for
//! this copy alone (candle's own `to_device` copies on the model's stream, behind every
//! kernel queued after the tensor, and into pageable memory). `FLEXMODEL_PINNED=0`, or
//! [`set_pinned_copies`], turns pinned copies off, for comparison.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{Device, Tensor};

use crate::Result;

/// Whether pinned copies are on: unset, read from the environment on first use.
static PINNED: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = 2;

/// The environment variable that turns pinned copies off (`0`, `off` or `false`).
pub const PINNED_VARIABLE: &str = "FLEXMODEL_PINNED";

/// Turns pinned copies on or off for this process (on by default, unless
/// `FLEXMODEL_PINNED` says off).
pub fn set_pinned_copies(on: bool) {
    PINNED.store(u8::from(on), Ordering::Relaxed);
}

/// Whether device-to-host copies go through pinned buffers on a copy stream.
pub fn pinned_copies() -> bool {
    match PINNED.load(Ordering::Relaxed) {
        UNSET => {
            let off = std::env::var(PINNED_VARIABLE)
                .is_ok_and(|v| matches!(v.trim(), "0" | "off" | "false"));
            set_pinned_copies(!off);
            !off
        }
        on => on == 1,
    }
}

/// `t` on the host: itself if it is there already, else a copy (detached from any
/// autograd graph).
pub fn to_host(t: &Tensor) -> Result<Tensor> {
    match t.device() {
        Device::Cpu => Ok(t.clone()),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if pinned_copies() => cuda::to_host(t),
        _ => Ok(t.detach().to_device(&Device::Cpu)?),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda::cudarc::driver::{CudaContext, CudaStream, PinnedHostSlice};
    use candle_core::cuda::{CudaDType, CudaStorage};
    use candle_core::{DType, Device, Storage, Tensor};

    use crate::{Error, Result};

    /// The smallest pinned buffer allocated: small pieces share a size class.
    const MIN_BUFFER: usize = 1 << 20;
    /// Free buffers kept per device.
    const KEPT_BUFFERS: usize = 8;

    /// A device's copy stream and its free pinned buffers.
    struct Copier {
        stream: Arc<CudaStream>,
        free: Mutex<Vec<PinnedHostSlice<u8>>>,
    }

    impl Copier {
        /// A free buffer of at least `bytes`, or a new one.
        fn take(&self, context: &Arc<CudaContext>, bytes: usize) -> Result<PinnedHostSlice<u8>> {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let fitting = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= bytes)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            if let Some(i) = fitting {
                return Ok(free.swap_remove(i));
            }
            drop(free);
            let size = bytes.max(MIN_BUFFER).next_power_of_two();
            // Plain page-locked memory (flags 0), not write-combined: the host reads it.
            // SAFETY: the buffer is written by the copy before any of it is read.
            unsafe { context.alloc_pinned_with_flags::<u8>(size, 0) }.map_err(cuda_error)
        }

        /// Keeps `buffer` for the next copy (up to [`KEPT_BUFFERS`], the largest).
        fn give_back(&self, buffer: PinnedHostSlice<u8>) {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            free.push(buffer);
            if free.len() > KEPT_BUFFERS {
                free.sort_by_key(|b| std::cmp::Reverse(b.len()));
                free.truncate(KEPT_BUFFERS);
            }
        }
    }

    fn cuda_error(e: impl std::fmt::Display) -> Error {
        Error::Cuda(e.to_string())
    }

    /// The copier of the device whose model stream is `model_stream`, made on first use.
    fn copier(model_stream: &Arc<CudaStream>) -> Result<Arc<Copier>> {
        static COPIERS: OnceLock<Mutex<HashMap<usize, Arc<Copier>>>> = OnceLock::new();
        let mut copiers = COPIERS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Keyed by the model stream: ranks sharing a GPU share its device and stream.
        let key = model_stream.cu_stream() as usize;
        if let Some(copier) = copiers.get(&key) {
            return Ok(copier.clone());
        }
        let copier = Arc::new(Copier {
            stream: model_stream.context().new_stream().map_err(cuda_error)?,
            free: Mutex::new(Vec::new()),
        });
        copiers.insert(key, copier.clone());
        Ok(copier)
    }

    /// The bytes of the contiguous CUDA tensor `t` through a pinned buffer on the copy
    /// stream of its device.
    pub(super) fn to_host(t: &Tensor) -> Result<Tensor> {
        let t = t.detach().contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            return Ok(t.to_device(&Device::Cpu)?);
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(Error::Internal(
                "a contiguous tensor without contiguous offsets",
            ));
        };
        let bytes = match t.dtype() {
            DType::U8 => copy::<u8>(cuda, start, end)?,
            DType::U32 => copy::<u32>(cuda, start, end)?,
            DType::I64 => copy::<i64>(cuda, start, end)?,
            DType::BF16 => copy::<half::bf16>(cuda, start, end)?,
            DType::F16 => copy::<half::f16>(cuda, start, end)?,
            DType::F32 => copy::<f32>(cuda, start, end)?,
            DType::F64 => copy::<f64>(cuda, start, end)?,
            _ => return Ok(t.to_device(&Device::Cpu)?),
        };
        Ok(Tensor::from_raw_buffer(
            &bytes,
            t.dtype(),
            t.dims(),
            &Device::Cpu,
        )?)
    }

    /// Elements `start..end` of `storage`, as bytes on the host.
    fn copy<T: CudaDType>(storage: &CudaStorage, start: usize, end: usize) -> Result<Vec<u8>> {
        let slice = storage.as_cuda_slice::<T>()?;
        let model_stream = storage.device.cuda_stream();
        let copier = copier(&model_stream)?;
        let bytes = (end - start) * std::mem::size_of::<T>();
        let mut buffer = copier.take(model_stream.context(), bytes)?;
        // The copy waits for the work queued so far on the model's stream (which made
        // the tensor), and for nothing queued after.
        let made = model_stream.record_event(None).map_err(cuda_error)?;
        copier.stream.wait(&made).map_err(cuda_error)?;
        let view = slice.slice(start..end);
        // SAFETY: `T` is plain data; its bytes are viewed as `bytes` u8s.
        let Some(raw) = (unsafe { view.transmute::<u8>(bytes) }) else {
            return Err(Error::Internal("a device view shorter than its bytes"));
        };
        copier
            .stream
            .memcpy_dtoh(&raw, &mut buffer)
            .map_err(cuda_error)?;
        // The buffer's event, recorded after the copy: this waits for the copy alone.
        let out = buffer.as_slice().map_err(cuda_error)?[..bytes].to_vec();
        copier.give_back(buffer);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_copies_can_be_turned_off_and_on() {
        set_pinned_copies(false);
        assert!(!pinned_copies());
        set_pinned_copies(true);
        assert!(pinned_copies());
    }

    #[test]
    fn host_tensors_are_returned_as_they_are() {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap();
        let host = to_host(&t).unwrap();
        assert_eq!(host.id(), t.id());
    }
}
