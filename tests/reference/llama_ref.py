"""Independent numpy reference of the LLaMA forward pass, reading the same GGUF file.

Everything is computed in float64 straight from the math of the architecture
(RMSNorm, rotate-half RoPE, grouped-query causal attention, SwiGLU), with hook names
from FlexModel-rs's DESIGN.md. Nothing here shares code with the Rust implementation.

    python3 tests/reference/llama_ref.py MODEL.gguf OUT.safetensors

writes the fixture that `tests/reference_parity.rs` compares against.
"""

import json
import struct
import sys

import numpy as np

from gguf_reader import GGUFFile

# Fixed token sequences of the fixture (batch of two; the first is
# "The capital of France is" in SmolLM2's tokenizer).
TOKENS = np.array([[504, 3575, 282, 4649, 314], [19556, 2087, 260, 2463, 30]])


def unpermute_rows(w, n_heads):
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE -> Hugging Face rotate-half)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class Llama:
    def __init__(self, path):
        f = GGUFFile(path)
        m = f.metadata
        arch = m["general.architecture"]
        self.n_layers = m[f"{arch}.block_count"]
        self.d_model = m[f"{arch}.embedding_length"]
        self.n_heads = m[f"{arch}.attention.head_count"]
        self.n_kv_heads = m[f"{arch}.attention.head_count_kv"]
        self.eps = m[f"{arch}.attention.layer_norm_rms_epsilon"]
        self.theta = m[f"{arch}.rope.freq_base"]
        self.d_head = self.d_model // self.n_heads
        self.embed = f.tensor("token_embd.weight")
        self.lm_head = f.tensor("output.weight") if "output.weight" in f.tensors else self.embed
        self.final_norm = f.tensor("output_norm.weight")
        self.layers = []
        for i in range(self.n_layers):
            t = lambda name: f.tensor(f"blk.{i}.{name}.weight")  # noqa: E731
            self.layers.append({
                "ln1": t("attn_norm"),
                "q": unpermute_rows(t("attn_q"), self.n_heads),
                "k": unpermute_rows(t("attn_k"), self.n_kv_heads),
                "v": t("attn_v"),
                "o": t("attn_output"),
                "ln2": t("ffn_norm"),
                "gate": t("ffn_gate"),
                "up": t("ffn_up"),
                "down": t("ffn_down"),
            })

    def normalized(self, x):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps)

    def rope(self, x):
        """Rotate-half RoPE of x [b, t, h, d_head]."""
        t, d = x.shape[1], x.shape[3]
        inv_freq = 1.0 / self.theta ** (np.arange(0, d, 2) / d)
        angles = np.outer(np.arange(t), inv_freq)
        cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[None, :, None, :]
        sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[None, :, None, :]
        rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
        return x * cos + rotated * sin

    def forward(self, tokens):
        """All hook points of the pass, name -> array (batch first)."""
        b, t = tokens.shape
        hooks = {}
        x = self.embed[tokens]
        hooks["hook_embed"] = x
        mask = np.triu(np.ones((t, t), dtype=bool), k=1)
        for i, w in enumerate(self.layers):
            p = f"blocks.{i}."
            hooks[p + "hook_resid_pre"] = x
            n1 = self.normalized(x)
            hooks[p + "ln1.hook_normalized"] = n1
            h = n1 * w["ln1"]
            q = (h @ w["q"].T).reshape(b, t, self.n_heads, self.d_head)
            k = (h @ w["k"].T).reshape(b, t, self.n_kv_heads, self.d_head)
            v = (h @ w["v"].T).reshape(b, t, self.n_kv_heads, self.d_head)
            hooks[p + "attn.hook_q"], hooks[p + "attn.hook_k"], hooks[p + "attn.hook_v"] = q, k, v
            rq, rk = self.rope(q), self.rope(k)
            hooks[p + "attn.hook_rot_q"], hooks[p + "attn.hook_rot_k"] = rq, rk
            group = self.n_heads // self.n_kv_heads
            kh = np.repeat(rk, group, axis=2)  # query head j reads kv head j // group
            vh = np.repeat(v, group, axis=2)
            scores = np.einsum("bqhd,bkhd->bhqk", rq, kh) / np.sqrt(self.d_head)
            scores = np.where(mask, -np.inf, scores)
            hooks[p + "attn.hook_attn_scores"] = scores
            e = np.exp(scores - scores.max(axis=-1, keepdims=True))
            pattern = e / e.sum(axis=-1, keepdims=True)
            hooks[p + "attn.hook_pattern"] = pattern
            z = np.einsum("bhqk,bkhd->bqhd", pattern, vh)
            hooks[p + "attn.hook_z"] = z
            attn_out = z.reshape(b, t, -1) @ w["o"].T
            hooks[p + "hook_attn_out"] = attn_out
            x = x + attn_out
            hooks[p + "hook_resid_mid"] = x
            n2 = self.normalized(x)
            hooks[p + "ln2.hook_normalized"] = n2
            h = n2 * w["ln2"]
            gate, up = h @ w["gate"].T, h @ w["up"].T
            post = gate / (1.0 + np.exp(-gate)) * up
            hooks[p + "mlp.hook_pre"], hooks[p + "mlp.hook_pre_linear"] = gate, up
            hooks[p + "mlp.hook_post"] = post
            mlp_out = post @ w["down"].T
            hooks[p + "hook_mlp_out"] = mlp_out
            x = x + mlp_out
            hooks[p + "hook_resid_post"] = x
        nf = self.normalized(x)
        hooks["ln_final.hook_normalized"] = nf
        hooks["unembed.hook_out"] = (nf * self.final_norm) @ self.lm_head.T
        return hooks


def save_safetensors(path, tensors):
    """Write name -> array as a safetensors file (f32 for floats, i64 for integers)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        if np.issubdtype(array.dtype, np.integer):
            data, dtype = np.ascontiguousarray(array, "<i8"), "I64"
        else:
            data, dtype = np.ascontiguousarray(array, "<f4"), "F32"
        raw = data.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)


def main():
    model_path, out_path = sys.argv[1], sys.argv[2]
    model = Llama(model_path)
    hooks = model.forward(TOKENS)
    fixture = {"tokens": TOKENS, "unembed.hook_out": hooks["unembed.hook_out"]}
    for i in range(model.n_layers):
        fixture[f"blocks.{i}.hook_resid_pre"] = hooks[f"blocks.{i}.hook_resid_pre"]
    last = f"blocks.{model.n_layers - 1}.hook_resid_post"
    fixture[last] = hooks[last]
    save_safetensors(out_path, fixture)
    print(f"wrote {len(fixture)} tensors to {out_path}")


if __name__ == "__main__":
    main()
