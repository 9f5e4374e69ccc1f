"""Independent numpy reference of the LLaMA forward pass, reading the same GGUF file.

Everything is computed in float64 straight from the math of the architecture
(RMSNorm, rotate-half RoPE, grouped-query causal attention, SwiGLU), with hook names
from FlexModel-rs's docs/ARCHITECTURE.md. Nothing here shares code with the Rust implementation.

    python3 tests/reference/llama_ref.py fixture MODEL.gguf OUT.safetensors

writes the committed fixture that `tests/reference_parity.rs` compares against;

    python3 tests/reference/llama_ref.py hooks MODEL "1 2 3;4 5 6" OUT.safetensors

writes every hook point of a batch for a .gguf file or a Hugging Face directory.
"""

import argparse
import json
import os
import struct

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
    """The model's numbers and weights (Hugging Face names and layout), in float64."""

    def __init__(self, config, weights):
        self.n_layers = config["n_layers"]
        self.n_heads = config["n_heads"]
        self.n_kv_heads = config["n_kv_heads"]
        self.d_head = config["d_head"]
        self.eps = config["eps"]
        self.theta = config["theta"]
        self.embed = weights["model.embed_tokens.weight"]
        self.lm_head = weights.get("lm_head.weight", self.embed)
        self.final_norm = weights["model.norm.weight"]
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            w = {
                "ln1": "input_layernorm.weight", "ln2": "post_attention_layernorm.weight",
                "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
                "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
                "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
                "down": "mlp.down_proj.weight",
            }
            layer = {key: weights[p + name] for key, name in w.items()}
            for key in "qkv":  # Qwen2-style biases, zero where absent
                bias = weights.get(p + f"self_attn.{key}_proj.bias")
                layer[key + "_bias"] = 0.0 if bias is None else bias
            self.layers.append(layer)

    @classmethod
    def from_gguf(cls, path):
        f = GGUFFile(path)
        m = f.metadata
        arch = m["general.architecture"]
        n_heads = m[f"{arch}.attention.head_count"]
        n_kv_heads = m.get(f"{arch}.attention.head_count_kv", n_heads)
        config = {
            "n_layers": m[f"{arch}.block_count"],
            "n_heads": n_heads,
            "n_kv_heads": n_kv_heads,
            "d_head": m[f"{arch}.embedding_length"] // n_heads,
            "eps": m[f"{arch}.attention.layer_norm_rms_epsilon"],
            "theta": m.get(f"{arch}.rope.freq_base", 10000.0),
        }
        names = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
        block = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                 "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
        weights = {}
        for name in f.tensors:
            if name in names:
                weights[names[name]] = f.tensor(name)
                continue
            _, layer, module, kind = name.split(".")
            hf = f"model.layers.{layer}.{block[module]}.{kind}"
            w = f.tensor(name)
            if arch == "llama" and module in ("attn_q", "attn_k"):
                w = unpermute_rows(w.reshape(w.shape[0], -1),
                                   n_heads if module == "attn_q" else n_kv_heads).reshape(w.shape)
            weights[hf] = w
        return cls(config, weights)

    @classmethod
    def from_hf_dir(cls, path):
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        n_heads = c["num_attention_heads"]
        config = {
            "n_layers": c["num_hidden_layers"],
            "n_heads": n_heads,
            "n_kv_heads": c.get("num_key_value_heads", n_heads),
            "d_head": c.get("head_dim") or c["hidden_size"] // n_heads,
            "eps": c["rms_norm_eps"],
            "theta": c.get("rope_theta", 10000.0),
        }
        weights = load_safetensors(os.path.join(path, "model.safetensors"))
        if c.get("tie_word_embeddings"):
            weights.pop("lm_head.weight", None)
        return cls(config, weights)

    def scale(self, x):
        """The RMS divisor sqrt(mean(x^2) + eps) over the last axis, kept."""
        return np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps)

    def rope(self, x):
        """Rotate-half RoPE of x [b, t, h, d_head]."""
        t, d = x.shape[1], x.shape[3]
        inv_freq = 1.0 / self.theta ** (np.arange(0, d, 2) / d)
        angles = np.outer(np.arange(t), inv_freq)
        cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[None, :, None, :]
        sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[None, :, None, :]
        rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
        return x * cos + rotated * sin

    def forward(self, tokens, edits=None):
        """Every hook point's value (before any edit), name -> array (batch first).

        `edits` maps hook names to functions of the value; the pass continues with
        the edited value, as FlexModel-rs's hooks do.
        """
        b, t = tokens.shape
        hooks, edits = {}, edits or {}

        def hook(name, value):
            hooks[name] = value
            return edits[name](value) if name in edits else value

        tokens = hook("hook_tokens", tokens.astype(np.float64)).astype(np.int64)
        x = hook("hook_embed", self.embed[tokens])
        mask = np.triu(np.ones((t, t), dtype=bool), k=1)
        group = self.n_heads // self.n_kv_heads
        d_head = self.d_head

        def norm(hook_prefix, x, weight):
            s = hook(hook_prefix + "hook_scale", self.scale(x))
            return hook(hook_prefix + "hook_normalized", x / s) * weight

        def per_head(name, x, heads, ln, weight, bias):
            """Each head's projection of its own normed copy of x (TransformerLens's split
            q/k/v input): [b, t, heads, d_head]."""
            copies = hook(name, np.repeat(x[:, :, None, :], heads, axis=2))
            normed = copies / self.scale(copies) * ln
            out = np.einsum("bthd,hed->bthe", normed, weight.reshape(heads, d_head, -1))
            return out + np.reshape(bias, (heads, d_head)) if np.ndim(bias) else out

        for i, w in enumerate(self.layers):
            p = f"blocks.{i}."
            x = hook(p + "hook_resid_pre", x)
            norm(p + "ln1.", x, w["ln1"])  # the shared path; each head below norms its copy
            q, k, v = (
                hook(p + f"attn.hook_{key}",
                     per_head(p + f"hook_{key}_input", x, heads, w["ln1"], w[key], w[key + "_bias"]))
                for key, heads in (("q", self.n_heads), ("k", self.n_kv_heads), ("v", self.n_kv_heads))
            )
            q = hook(p + "attn.hook_rot_q", self.rope(q))
            k = hook(p + "attn.hook_rot_k", self.rope(k))
            k = np.repeat(k, group, axis=2)  # query head j reads kv head j // group
            v = np.repeat(v, group, axis=2)
            scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d_head)
            scores = hook(p + "attn.hook_attn_scores", np.where(mask, -np.inf, scores))
            e = np.exp(scores - scores.max(axis=-1, keepdims=True))
            pattern = hook(p + "attn.hook_pattern", e / e.sum(axis=-1, keepdims=True))
            z = hook(p + "attn.hook_z", np.einsum("bhqk,bkhd->bqhd", pattern, v))
            w_o = w["o"].reshape(-1, self.n_heads, d_head)  # [d_model, h, d_head]
            result = hook(p + "attn.hook_result", np.einsum("bthe,dhe->bthd", z, w_o))
            x = x + hook(p + "hook_attn_out", result.sum(axis=2))
            x = hook(p + "hook_resid_mid", x)
            h = norm(p + "ln2.", hook(p + "hook_mlp_in", x), w["ln2"])
            gate = hook(p + "mlp.hook_pre", h @ w["gate"].T)
            up = hook(p + "mlp.hook_pre_linear", h @ w["up"].T)
            post = hook(p + "mlp.hook_post", gate / (1.0 + np.exp(-gate)) * up)
            x = x + hook(p + "hook_mlp_out", post @ w["down"].T)
            x = hook(p + "hook_resid_post", x)
        hook("unembed.hook_out", norm("ln_final.", x, self.final_norm) @ self.lm_head.T)
        return hooks


def parse_edit(spec):
    """`NAME=zero-head:H`, `NAME=scale:F` or `NAME=add:FILE` -> (NAME, function)."""
    name, action = spec.split("=", 1)
    kind, arg = action.split(":", 1)
    if kind == "scale":
        return name, lambda x: x * float(arg)
    if kind == "zero-head":
        head_dim = 1 if name.endswith(("hook_attn_scores", "hook_pattern")) else 2

        def zero_head(x):
            x = x.copy()
            index = [slice(None)] * x.ndim
            index[head_dim] = int(arg)
            x[tuple(index)] = 0.0
            return x
        return name, zero_head
    if kind == "add":
        delta = load_safetensors(arg)[name]
        return name, lambda x: x + delta
    raise ValueError(f"unknown edit {spec!r}")


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


def load_safetensors(path):
    """name -> float64 array of a safetensors file (F32, F16 or BF16)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = np.frombuffer(data, np.uint8, end - start, 8 + n + start)
        if info["dtype"] == "BF16":
            values = (raw.view("<u2").astype(np.uint32) << 16).view("<f4")
        else:
            values = raw.view({"F32": "<f4", "F16": "<f2"}[info["dtype"]])
        out[name] = values.astype(np.float64).reshape(info["shape"])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fixture = sub.add_parser("fixture", help="the committed SmolLM2 fixture")
    fixture.add_argument("gguf")
    fixture.add_argument("out")
    hooks = sub.add_parser("hooks", help="every hook point of one batch")
    hooks.add_argument("model", help="a .gguf file or a Hugging Face directory")
    hooks.add_argument("tokens", help="sequences separated by ';', ids by spaces")
    hooks.add_argument("out")
    hooks.add_argument("--edit", action="append", default=[],
                       help="NAME=zero-head:H, NAME=scale:F or NAME=add:FILE (repeatable)")
    args = parser.parse_args()

    if args.command == "fixture":
        model = Llama.from_gguf(args.gguf)
        hooks = model.forward(TOKENS)
        out = {"tokens": TOKENS, "unembed.hook_out": hooks["unembed.hook_out"]}
        for i in range(model.n_layers):
            out[f"blocks.{i}.hook_resid_pre"] = hooks[f"blocks.{i}.hook_resid_pre"]
        last = f"blocks.{model.n_layers - 1}.hook_resid_post"
        out[last] = hooks[last]
    else:
        path = args.model
        model = Llama.from_hf_dir(path) if os.path.isdir(path) else Llama.from_gguf(path)
        tokens = np.array([[int(x) for x in seq.split()] for seq in args.tokens.split(";")])
        out = model.forward(tokens, dict(parse_edit(e) for e in args.edit))
    save_safetensors(args.out, out)
    print(f"wrote {len(out)} tensors to {args.out}")


if __name__ == "__main__":
    main()
