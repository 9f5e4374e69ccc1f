"""A small, independent GGUF reader in numpy (no llama.cpp or candle code).

It parses the GGUF v2/v3 container (metadata and tensor table) and dequantizes the
formats the reference needs to f64 numpy arrays in row-major order (the reverse of
GGUF's dimension order).
"""

import struct

import numpy as np

# GGUF metadata value types.
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9

# ggml tensor types: name, elements per block, bytes per block.
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}


class GGUFFile:
    """Header, metadata and tensor table of one GGUF file; tensors are read on demand."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.data = f.read()
        self.pos = 0
        if self._take(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version}")
        n_tensors = self._scalar("<Q")
        n_kv = self._scalar("<Q")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<I"))
        self.tensors = {}
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            dims = [self._scalar("<Q") for _ in range(n_dims)]
            ggml_type = self._scalar("<I")
            offset = self._scalar("<Q")
            self.tensors[name] = (dims, ggml_type, offset)
        alignment = self.metadata.get("general.alignment", 32)
        self.data_start = (self.pos + alignment - 1) // alignment * alignment

    def _take(self, n):
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def _scalar(self, fmt):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self._take(size))[0]

    def _string(self):
        return self._take(self._scalar("<Q")).decode("utf-8")

    def _value(self, kind):
        if kind in _SCALARS:
            return self._scalar(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item_kind = self._scalar("<I")
            return [self._value(item_kind) for _ in range(self._scalar("<Q"))]
        raise ValueError(f"{self.path}: unknown metadata value type {kind}")

    def tensor(self, name):
        """The tensor `name` dequantized to f64, shape in row-major order."""
        dims, ggml_type, offset = self.tensors[name]
        if ggml_type not in GGML_TYPES:
            raise ValueError(f"{self.path}: tensor {name}: unsupported ggml type {ggml_type}")
        kind, block, block_bytes = GGML_TYPES[ggml_type]
        count = int(np.prod(dims))
        start = self.data_start + offset
        raw = np.frombuffer(self.data, np.uint8, count // block * block_bytes, start)
        values = _DEQUANT[kind](raw, count)
        return values.reshape(list(reversed(dims)))


def _f16(raw, count):
    return raw.view("<f2")[:count].astype(np.float64)


def _f32(raw, count):
    return raw.view("<f4")[:count].astype(np.float64)


def _bf16(raw, count):
    bits = raw.view("<u2")[:count].astype(np.uint32) << 16
    return bits.view("<f4").astype(np.float64)


def _nibbles(qs):
    """Low nibbles are elements 0..15 of a 32-block, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float64)


def _q4_0(raw, count):
    b = raw.reshape(-1, 18)
    d = b[:, :2].copy().view("<f2").astype(np.float64)
    return ((_nibbles(b[:, 2:]) - 8.0) * d).reshape(count)


def _q4_1(raw, count):
    b = raw.reshape(-1, 20)
    d = b[:, 0:2].copy().view("<f2").astype(np.float64)
    m = b[:, 2:4].copy().view("<f2").astype(np.float64)
    return (_nibbles(b[:, 4:]) * d + m).reshape(count)


def _q8_0(raw, count):
    b = raw.reshape(-1, 34)
    d = b[:, :2].copy().view("<f2").astype(np.float64)
    q = b[:, 2:].copy().view(np.int8).astype(np.float64)
    return (q * d).reshape(count)


def _k_scale_min(scales, j):
    """6-bit scale and min of sub-block j (0..7) from the 12 packed bytes of Q4_K."""
    if j < 4:
        return scales[:, j] & 63, scales[:, j + 4] & 63
    sc = (scales[:, j + 4] & 0x0F) | ((scales[:, j - 4] >> 6) << 4)
    mn = (scales[:, j + 4] >> 4) | ((scales[:, j] >> 6) << 4)
    return sc, mn


def _q4_k(raw, count):
    b = raw.reshape(-1, 144)
    d = b[:, 0:2].copy().view("<f2").astype(np.float64)
    dmin = b[:, 2:4].copy().view("<f2").astype(np.float64)
    scales = b[:, 4:16].astype(np.int64)
    qs = b[:, 16:]
    out = np.empty((b.shape[0], 256))
    for chunk in range(4):  # 64 elements: 32 low nibbles then 32 high nibbles
        q = qs[:, chunk * 32:(chunk + 1) * 32]
        for half, nib in ((0, q & 0x0F), (1, q >> 4)):
            j = 2 * chunk + half
            sc, mn = _k_scale_min(scales, j)
            out[:, j * 32:(j + 1) * 32] = d * sc[:, None] * nib - dmin * mn[:, None]
    return out.reshape(count)


def _q6_k(raw, count):
    b = raw.reshape(-1, 210)
    ql = b[:, 0:128].astype(np.int64)
    qh = b[:, 128:192].astype(np.int64)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float64)
    d = b[:, 208:210].copy().view("<f2").astype(np.float64)
    out = np.empty((b.shape[0], 256))
    for n in range(2):  # two halves of 128 elements
        l_lo, l_hi = ql[:, 64 * n:64 * n + 32], ql[:, 64 * n + 32:64 * n + 64]
        h = qh[:, 32 * n:32 * n + 32]
        quads = [
            (l_lo & 0x0F) | (((h >> 0) & 3) << 4),
            (l_hi & 0x0F) | (((h >> 2) & 3) << 4),
            (l_lo >> 4) | (((h >> 4) & 3) << 4),
            (l_hi >> 4) | (((h >> 6) & 3) << 4),
        ]
        for k, q in enumerate(quads):
            base = 128 * n + 32 * k
            for s in range(2):  # a scale per 16 elements
                cols = slice(base + 16 * s, base + 16 * s + 16)
                scale = sc[:, 8 * n + 2 * k + s][:, None]
                out[:, cols] = d * scale * (q[:, 16 * s:16 * s + 16] - 32)
    return out.reshape(count)


_DEQUANT = {
    "F32": _f32, "F16": _f16, "BF16": _bf16, "Q4_0": _q4_0, "Q4_1": _q4_1,
    "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k,
}
