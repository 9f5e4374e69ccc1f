//! The wire format: a fixed header, the shape, then the payload's raw bytes.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "FMR1"
//!      4     1  kind (FrameKind)
//!      5     1  dtype (WireDtype)
//!      6     1  number of dimensions (at most MAX_DIMS)
//!      7     1  reserved, 0
//!      8     8  pass
//!     16     4  point (a tap of the hook protocol)
//!     20     4  call
//!     24     8  payload length in bytes
//!     32  8·nd  shape, one u64 per dimension
//!      …        payload: the tensor's elements, little-endian, row-major
//! ```
//!
//! Every integer is little-endian. A control frame's payload is a serialized message
//! (dtype `u8`, one dimension equal to its length). The decoder checks the header —
//! magic, kind, dtype, dimensions, and the length against [`FrameCodec::max_payload`]
//! and against the shape — before it reserves any memory for the payload, so a
//! malformed, truncated or absurd frame costs nothing but the connection it came on.
//!
//! After the handshake a connection's codec is [sealed](FrameCodec::sealed): a 16-byte
//! tag follows each frame's payload, authenticating the frame and its place in the
//! connection (see `seal`). A sealed frame is delivered only once its tag checks out;
//! one that fails (or is malformed) is [`FrameError::Tampered`], and nothing of it is
//! returned.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use candle_core::{DType, Device, Storage, Tensor};
use tokio_util::codec::{Decoder, Encoder};

use super::seal::{Seal, TAG_BYTES, Unsealed};

/// The first bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FMR1";
/// The bytes of a header before the shape.
pub const HEADER_BYTES: usize = 32;
/// The most dimensions a tensor on the wire may have.
pub const MAX_DIMS: usize = 8;
/// The default limit on one frame's payload: 16 GiB, far above any activation of the
/// models here and far below what would let a bad length exhaust memory by itself.
pub const DEFAULT_MAX_PAYLOAD: u64 = 16 << 30;

/// What a frame carries; the receiver routes on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A serialized control message.
    Control = 0,
    /// A tensor that belongs to the control message before it.
    Attached = 1,
    /// A shard's piece of a hook call, to the driver.
    Piece = 2,
    /// An edited piece (or a gradient), from the driver to a shard.
    Edited = 3,
    /// A tensor of an in-model collective, between peers.
    Collective = 4,
    /// The transport's own: the sender received a frame that failed its check and is
    /// closing the connection (never delivered to the inbox).
    Abort = 5,
}

impl FrameKind {
    fn from_u8(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Control,
            1 => Self::Attached,
            2 => Self::Piece,
            3 => Self::Edited,
            4 => Self::Collective,
            5 => Self::Abort,
            _ => return None,
        })
    }
}

/// The element types a frame may carry, by their wire code.
const DTYPES: [(u8, DType); 7] = [
    (0, DType::U8),
    (1, DType::U32),
    (2, DType::I64),
    (3, DType::BF16),
    (4, DType::F16),
    (5, DType::F32),
    (6, DType::F64),
];

fn dtype_code(dtype: DType) -> Option<u8> {
    DTYPES.iter().find(|(_, d)| *d == dtype).map(|(c, _)| *c)
}

fn dtype_of(code: u8) -> Option<DType> {
    DTYPES.iter().find(|(c, _)| *c == code).map(|(_, d)| *d)
}

/// One frame: the routing fields of its header and its payload.
#[derive(Debug, Clone)]
pub struct Frame {
    /// What it carries.
    pub kind: FrameKind,
    /// The pass it belongs to.
    pub pass: u64,
    /// The hook point (a tap) it belongs to, or 0.
    pub point: u32,
    /// The call of that point, or 0.
    pub call: u32,
    /// The element type of the payload.
    pub dtype: DType,
    /// The shape of the payload.
    pub shape: Vec<usize>,
    /// The payload.
    pub body: Body,
}

/// A frame's payload.
#[derive(Debug, Clone)]
pub enum Body {
    /// Bytes as they came off the wire (or a control message's serialization).
    Bytes(Bytes),
    /// A tensor to send; its elements are copied straight into the write buffer.
    Tensor(Tensor),
}

/// A frame that could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not [`MAGIC`].
    #[error("not a FlexModel frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// An unknown kind code.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// An unknown dtype code.
    #[error("unknown dtype code {0}")]
    UnknownDtype(u8),
    /// A dtype the wire format does not carry.
    #[error("dtype {0:?} cannot be sent")]
    UnsupportedDtype(DType),
    /// More dimensions than [`MAX_DIMS`].
    #[error("{0} dimensions (at most {MAX_DIMS})")]
    TooManyDims(usize),
    /// The reserved byte is not zero.
    #[error("reserved header byte is {0}, not 0")]
    Reserved(u8),
    /// A payload longer than the limit.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// The length the header claims.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The length does not match the shape and dtype.
    #[error("payload of {len} bytes does not match shape {shape:?} of {dtype:?}")]
    LengthMismatch {
        /// The length the header claims.
        len: u64,
        /// The shape it claims.
        shape: Vec<u64>,
        /// The dtype it claims.
        dtype: DType,
    },
    /// A sealed frame failed its authentication check: altered, injected, replayed or
    /// out of order.
    #[error(transparent)]
    Tampered(#[from] Unsealed),
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({0} bytes left over)")]
    Truncated(usize),
    /// A tensor's data could not be read to send it.
    #[error("reading a tensor to send: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Frame {
    /// A control frame carrying `bytes` (a serialized message).
    pub fn control(bytes: Vec<u8>) -> Self {
        Self {
            kind: FrameKind::Control,
            pass: 0,
            point: 0,
            call: 0,
            dtype: DType::U8,
            shape: vec![bytes.len()],
            body: Body::Bytes(bytes.into()),
        }
    }

    /// The frame that tells the peer a frame of its failed its check here.
    pub(crate) fn abort() -> Self {
        Self {
            kind: FrameKind::Abort,
            ..Self::control(Vec::new())
        }
    }

    /// A frame carrying `tensor` (moved to the CPU if it is not there).
    pub fn tensor(
        kind: FrameKind,
        pass: u64,
        point: u32,
        call: u32,
        tensor: &Tensor,
    ) -> Result<Self, FrameError> {
        dtype_code(tensor.dtype()).ok_or(FrameError::UnsupportedDtype(tensor.dtype()))?;
        Ok(Self {
            kind,
            pass,
            point,
            call,
            dtype: tensor.dtype(),
            shape: tensor.dims().to_vec(),
            body: Body::Tensor(
                crate::host_copy::to_host(tensor).map_err(candle_core::Error::wrap)?,
            ),
        })
    }

    /// The payload as a tensor on the CPU (one copy out of the read buffer).
    pub fn to_tensor(&self) -> candle_core::Result<Tensor> {
        match &self.body {
            Body::Tensor(t) => Ok(t.clone()),
            Body::Bytes(bytes) => {
                // Received tensors land on the host; the shard brings them to its device.
                Tensor::from_raw_buffer(bytes, self.dtype, &self.shape, &Device::Cpu)
            }
        }
    }

    /// The payload's bytes (a control message's serialization).
    pub fn bytes(&self) -> Option<&Bytes> {
        match &self.body {
            Body::Bytes(b) => Some(b),
            Body::Tensor(_) => None,
        }
    }
}

/// Encodes and decodes [`Frame`]s; the read buffer is reused from frame to frame.
#[derive(Debug)]
pub struct FrameCodec {
    max_payload: u64,
    /// The connection's keys once its handshake is done.
    seal: Option<Seal>,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::with_max_payload(DEFAULT_MAX_PAYLOAD)
    }
}

/// A decoded header: everything but the payload.
struct Header {
    kind: FrameKind,
    dtype: DType,
    pass: u64,
    point: u32,
    call: u32,
    len: usize,
    shape: Vec<usize>,
}

impl FrameCodec {
    /// A codec that refuses payloads longer than `max_payload` bytes.
    pub fn with_max_payload(max_payload: u64) -> Self {
        Self {
            max_payload,
            seal: None,
        }
    }

    /// The codec of a connection past its handshake: every frame sealed with `seal`.
    pub(crate) fn sealed(seal: Seal) -> Self {
        Self {
            seal: Some(seal),
            ..Self::default()
        }
    }

    /// The longest payload this codec accepts.
    pub fn max_payload(&self) -> u64 {
        self.max_payload
    }

    /// The header at the front of `src`, checked, once all of it (with the shape) is
    /// there; `None` while it is incomplete.
    fn header(&self, src: &[u8]) -> Result<Option<Header>, FrameError> {
        let Some(fixed) = src.get(..HEADER_BYTES) else {
            // Fail fast on garbage: check the magic as soon as four bytes are in.
            if let Some(magic) = src.get(..4)
                && magic != MAGIC
            {
                return Err(FrameError::BadMagic([
                    magic[0], magic[1], magic[2], magic[3],
                ]));
            }
            return Ok(None);
        };
        let mut h = fixed;
        let mut magic = [0u8; 4];
        h.copy_to_slice(&mut magic);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let kind = h.get_u8();
        let kind = FrameKind::from_u8(kind).ok_or(FrameError::UnknownKind(kind))?;
        let dtype = h.get_u8();
        let dtype = dtype_of(dtype).ok_or(FrameError::UnknownDtype(dtype))?;
        let ndim = h.get_u8() as usize;
        if ndim > MAX_DIMS {
            return Err(FrameError::TooManyDims(ndim));
        }
        let reserved = h.get_u8();
        if reserved != 0 {
            return Err(FrameError::Reserved(reserved));
        }
        let (pass, point, call, len) = (
            h.get_u64_le(),
            h.get_u32_le(),
            h.get_u32_le(),
            h.get_u64_le(),
        );
        if len > self.max_payload {
            return Err(FrameError::TooLong {
                len,
                max: self.max_payload,
            });
        }
        let Some(mut dims) = src.get(HEADER_BYTES..HEADER_BYTES + 8 * ndim) else {
            return Ok(None);
        };
        let shape: Vec<u64> = (0..ndim).map(|_| dims.get_u64_le()).collect();
        let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let expected = elements.and_then(|n| n.checked_mul(dtype.size_in_bytes() as u64));
        if expected != Some(len) {
            return Err(FrameError::LengthMismatch { len, shape, dtype });
        }
        // Both fit in usize: len is at most max_payload, and every dimension divides it
        // (or the length is 0).
        let len = usize::try_from(len).map_err(|_| FrameError::TooLong {
            len,
            max: usize::MAX as u64,
        })?;
        let shape = shape.into_iter().map(|d| d as usize).collect();
        Ok(Some(Header {
            kind,
            dtype,
            pass,
            point,
            call,
            len,
            shape,
        }))
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let header = match (self.header(src), &self.seal) {
            (Ok(Some(header)), _) => header,
            (Ok(None), _) => return Ok(None),
            (Err(e), None) => return Err(e),
            // Past the handshake only an altered frame can be malformed.
            (Err(e), Some(seal)) => {
                tracing::debug!(error = %e, "a malformed frame on a sealed connection");
                return Err(Unsealed {
                    sequence: seal.received(),
                }
                .into());
            }
        };
        let start = HEADER_BYTES + 8 * header.shape.len();
        let tag = if self.seal.is_some() { TAG_BYTES } else { 0 };
        let total = start + header.len + tag;
        if src.len() < total {
            // The length is checked, so reserving the rest is bounded by the limit.
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total);
        if let Some(seal) = &mut self.seal {
            let (bytes, tag) = frame.split_at(start + header.len);
            seal.open(bytes, tag)?;
        }
        frame.advance(start);
        frame.truncate(header.len);
        let payload = frame.freeze();
        Ok(Some(Frame {
            kind: header.kind,
            pass: header.pass,
            point: header.point,
            call: header.call,
            dtype: header.dtype,
            shape: header.shape,
            body: Body::Bytes(payload),
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated(src.len())),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let dtype = dtype_code(frame.dtype).ok_or(FrameError::UnsupportedDtype(frame.dtype))?;
        if frame.shape.len() > MAX_DIMS {
            return Err(FrameError::TooManyDims(frame.shape.len()));
        }
        let len = (frame.shape.iter().product::<usize>() * frame.dtype.size_in_bytes()) as u64;
        if len > self.max_payload {
            return Err(FrameError::TooLong {
                len,
                max: self.max_payload,
            });
        }
        let tag = if self.seal.is_some() { TAG_BYTES } else { 0 };
        dst.reserve(HEADER_BYTES + 8 * frame.shape.len() + len as usize + tag);
        let start = dst.len();
        dst.put_slice(&MAGIC);
        dst.put_u8(frame.kind as u8);
        dst.put_u8(dtype);
        dst.put_u8(frame.shape.len() as u8);
        dst.put_u8(0);
        dst.put_u64_le(frame.pass);
        dst.put_u32_le(frame.point);
        dst.put_u32_le(frame.call);
        dst.put_u64_le(len);
        for &d in &frame.shape {
            dst.put_u64_le(d as u64);
        }
        let before = dst.len();
        match &frame.body {
            Body::Bytes(bytes) => dst.put_slice(bytes),
            Body::Tensor(t) => put_elements(t, dst)?,
        }
        if (dst.len() - before) as u64 != len {
            return Err(FrameError::LengthMismatch {
                len: (dst.len() - before) as u64,
                shape: frame.shape.iter().map(|&d| d as u64).collect(),
                dtype: frame.dtype,
            });
        }
        if let Some(seal) = &mut self.seal {
            let tag = seal.seal(&dst[start..]);
            dst.put_slice(&tag);
        }
        Ok(())
    }
}

#[cfg(target_endian = "big")]
compile_error!(
    "the wire format copies tensors as little-endian bytes: big-endian hosts are not supported"
);

/// Appends the elements of `t` (on the CPU) to `dst` in row-major order.
fn put_elements(t: &Tensor, dst: &mut BytesMut) -> Result<(), FrameError> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(FrameError::Tensor(candle_core::Error::Msg(
            "a tensor to send must be on the CPU".into(),
        )));
    };
    let (start, end) = layout.contiguous_offsets().ok_or(candle_core::Error::Msg(
        "a contiguous tensor has no offsets".into(),
    ))?;
    use candle_core::CpuStorage as C;
    let bytes: &[u8] = match cpu {
        C::U8(v) => &v[start..end],
        C::U32(v) => bytemuck::cast_slice(&v[start..end]),
        C::I64(v) => bytemuck::cast_slice(&v[start..end]),
        C::BF16(v) => bytemuck::cast_slice(&v[start..end]),
        C::F16(v) => bytemuck::cast_slice(&v[start..end]),
        C::F32(v) => bytemuck::cast_slice(&v[start..end]),
        C::F64(v) => bytemuck::cast_slice(&v[start..end]),
        _ => return Err(FrameError::UnsupportedDtype(t.dtype())),
    };
    dst.put_slice(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn encoded(frame: Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::default().encode(frame, &mut buf).unwrap();
        buf
    }

    fn sample() -> Tensor {
        Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap()
    }

    #[test]
    fn a_tensor_frame_round_trips_bit_for_bit() {
        let t = sample().narrow(2, 1, 2).unwrap();
        let mut buf = encoded(Frame::tensor(FrameKind::Piece, 7, 42, 3, &t).unwrap());
        let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(
            (frame.kind, frame.pass, frame.point, frame.call),
            (FrameKind::Piece, 7, 42, 3)
        );
        let back = frame.to_tensor().unwrap();
        assert_eq!(back.dims(), [2, 3, 2]);
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        for dtype in [
            DType::U32,
            DType::BF16,
            DType::F16,
            DType::I64,
            DType::F64,
            DType::U8,
        ] {
            let t = sample().to_dtype(dtype).unwrap();
            let mut buf = encoded(Frame::tensor(FrameKind::Attached, 0, 0, 0, &t).unwrap());
            let back = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
            let back = back.to_tensor().unwrap().to_dtype(DType::F32).unwrap();
            let want = t.to_dtype(DType::F32).unwrap();
            assert_eq!(
                back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{dtype:?}"
            );
        }
    }

    /// The two ends' codecs of a fresh sealed connection.
    fn sealed_pair() -> (FrameCodec, FrameCodec) {
        use crate::transport::auth::{Role, Token, nonce};
        let (token, d, a) = (Token::random(), nonce(), nonce());
        let side = |role| FrameCodec::sealed(Seal::new(&token, role, &d, &a, "g", 0));
        (side(Role::Dialer), side(Role::Acceptor))
    }

    #[test]
    fn sealed_frames_decode_to_what_was_sent_and_any_flipped_byte_is_tampering() {
        let (mut sender, mut receiver) = sealed_pair();
        let mut wire = BytesMut::new();
        for pass in 0..3 {
            let frame = Frame::tensor(FrameKind::Piece, pass, 1, 0, &sample()).unwrap();
            sender.encode(frame, &mut wire).unwrap();
        }
        let one = wire.len() / 3;
        assert_eq!(one, HEADER_BYTES + 3 * 8 + 24 * 4 + TAG_BYTES);
        for pass in 0..3 {
            let frame = receiver.decode(&mut wire).unwrap().unwrap();
            assert_eq!(frame.pass, pass);
            let back: Vec<f32> = frame
                .to_tensor()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(back, (0..24).map(|i| i as f32).collect::<Vec<_>>());
        }
        // A byte flipped anywhere: the magic, the kind, the routing fields, the shape, the
        // payload or the tag.
        for at in [
            0,
            4,
            8,
            16,
            HEADER_BYTES + 3,
            HEADER_BYTES + 24 + 5,
            one - 1,
        ] {
            let (mut sender, mut receiver) = sealed_pair();
            let mut wire = BytesMut::new();
            let frame = Frame::tensor(FrameKind::Piece, 1, 1, 0, &sample()).unwrap();
            sender.encode(frame, &mut wire).unwrap();
            wire[at] ^= 0x10;
            let err = receiver.decode(&mut wire).unwrap_err();
            assert!(
                matches!(err, FrameError::Tampered(Unsealed { sequence: 0 })),
                "byte {at}: {err}"
            );
        }
    }

    #[test]
    fn frames_arriving_byte_by_byte_decode_once_complete() {
        let first = encoded(Frame::control(b"hello".to_vec()));
        let second = encoded(Frame::tensor(FrameKind::Edited, 1, 2, 3, &sample()).unwrap());
        let stream: Vec<u8> = first.iter().chain(second.iter()).copied().collect();
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for byte in stream {
            buf.put_u8(byte);
            if let Some(frame) = codec.decode(&mut buf).unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].bytes().unwrap().as_ref(), b"hello");
        assert_eq!(frames[1].shape, [2, 3, 4]);
    }

    #[test]
    fn an_absurd_length_is_refused_before_anything_is_reserved() {
        let mut buf = encoded(Frame::control(vec![0; 16]));
        // Claim a payload of 2^60 bytes.
        buf[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
        buf[32..40].copy_from_slice(&(1u64 << 60).to_le_bytes());
        buf.truncate(40);
        let capacity = buf.capacity();
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLong { .. }), "{err}");
        assert_eq!(buf.capacity(), capacity, "nothing reserved");
        // A length within the limit that disagrees with the shape is refused too.
        let mut buf = encoded(Frame::tensor(FrameKind::Piece, 0, 0, 0, &sample()).unwrap());
        buf[32..40].copy_from_slice(&5u64.to_le_bytes());
        let err = FrameCodec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::LengthMismatch { .. }), "{err}");
        // Dimensions whose product overflows.
        let mut buf = encoded(Frame::tensor(FrameKind::Piece, 0, 0, 0, &sample()).unwrap());
        for d in 0..3 {
            buf[32 + 8 * d..40 + 8 * d].copy_from_slice(&u64::MAX.to_le_bytes());
        }
        assert!(FrameCodec::default().decode(&mut buf).is_err());
    }

    #[test]
    fn a_truncated_frame_is_an_error_at_the_end_of_the_stream() {
        let mut buf = encoded(Frame::tensor(FrameKind::Piece, 0, 0, 0, &sample()).unwrap());
        buf.truncate(buf.len() - 1);
        let mut codec = FrameCodec::default();
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(FrameError::Truncated(_))
        ));
    }

    /// Random bytes, and valid frames with random bytes changed, truncated or extended:
    /// the decoder returns frames or an error, never panics, and never holds more than
    /// the limit.
    #[test]
    fn random_and_mutated_frames_never_panic_or_overallocate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let max = 1 << 20;
        let valid = [
            encoded(Frame::control(b"{\"run\":1}".to_vec())),
            encoded(Frame::tensor(FrameKind::Piece, 3, 9, 1, &sample()).unwrap()),
            encoded(
                Frame::tensor(
                    FrameKind::Collective,
                    3,
                    0,
                    0,
                    &sample().to_dtype(DType::BF16).unwrap(),
                )
                .unwrap(),
            ),
        ];
        let (mut frames, mut errors) = (0, 0);
        for round in 0..20_000 {
            let mut bytes: Vec<u8> = match round % 4 {
                0 => (0..rng.random_range(0..200))
                    .map(|_| rng.random())
                    .collect(),
                _ => {
                    let mut b = valid[rng.random_range(0..valid.len())].to_vec();
                    for _ in 0..rng.random_range(1..4) {
                        let i = rng.random_range(0..b.len());
                        b[i] = rng.random();
                    }
                    b
                }
            };
            if round % 3 == 0 {
                bytes.truncate(rng.random_range(0..=bytes.len()));
            }
            // Keep the magic often, so that the checks past it are reached.
            if round % 2 == 0 && bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&MAGIC);
            }
            let mut codec = FrameCodec::with_max_payload(max);
            let mut buf = BytesMut::from(&bytes[..]);
            loop {
                match codec.decode_eof(&mut buf) {
                    Ok(Some(frame)) => {
                        frames += 1;
                        let len = frame.bytes().map_or(0, |b| b.len()) as u64;
                        assert!(len <= max);
                        let _ = frame.to_tensor();
                    }
                    Ok(None) => break,
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
                assert!(
                    buf.capacity() as u64 <= max + 4096,
                    "capacity {}",
                    buf.capacity()
                );
            }
        }
        assert!(
            frames > 1000 && errors > 1000,
            "{frames} frames, {errors} errors"
        );
    }
}
