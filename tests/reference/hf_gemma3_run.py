"""Hook points and greedy generations of a Gemma 3 model as Hugging Face transformers
itself computes them.

    python hf_gemma3_run.py points HF_DIR "1 2 3;4 5" OUT.safetensors [all|last]
    python hf_gemma3_run.py generate HF_DIR "1 2 3;4 5" OUT.safetensors N

HF_DIR is a Hugging Face directory of a Gemma 3 text model (`Gemma3ForCausalLM`, loaded
in float32 with eager attention). Rows of unequal length are left-padded with an
attention mask and position ids that count real tokens, as `generate` makes them.

`points` writes every default hook point of FlexModel-rs's Gemma 3 but the attention
scores, under its names: module outputs and inputs taken with forward hooks; the RoPE
rotations with transformers' own rotary embeddings (local or global, by the layer's
type); each RMSNorm's `hook_scale` and `hook_normalized` from its input `x`, as
`sqrt(mean(x^2) + eps)` and `x / scale`. Padded positions are zero (as FlexModel-rs's
captures are); `last` keeps the logits of the last position only (long prompts).

`generate` writes `tokens`, the greedy continuation of N tokens of each row through
transformers' own key/value cache, and `recomputed`, the same without a cache.
"""

import os
import sys

import torch
from transformers import AutoModelForCausalLM
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

sys.path.insert(0, os.path.dirname(__file__))
from llama_ref import save_safetensors  # noqa: E402


def batch(rows):
    t = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()


def points(model, rows, logits):
    ids, mask = batch(rows)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    config = model.config
    h, kv, dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    b, t = ids.shape
    captured, norm_inputs = {}, {}

    def output_of(name, heads=None):
        def hook(module, inputs, output):
            value = output[0] if isinstance(output, tuple) else output
            captured[name] = value.reshape(b, t, heads, -1) if heads else value
        return hook

    def input_of(name, heads=None):
        def hook(module, args, kwargs):
            value = args[0] if args else kwargs["hidden_states"]
            captured[name] = value.reshape(b, t, heads, -1) if heads else value
        return hook

    def norm_input(name, eps, per_head=False):
        def hook(module, args):
            x = args[0]
            # q_norm and k_norm see [b, heads, t, d_head].
            norm_inputs[name] = (x.transpose(1, 2) if per_head else x, eps)
        return hook

    def norm_output(name):
        def hook(module, inputs, output):
            captured[name] = output.transpose(1, 2)
        return hook

    eps = config.rms_norm_eps
    model.model.embed_tokens.register_forward_hook(output_of("hook_embed"))
    model.model.norm.register_forward_pre_hook(norm_input("ln_final", eps))
    for i, layer in enumerate(model.model.layers):
        p = f"blocks.{i}"
        layer.register_forward_pre_hook(input_of(f"{p}.hook_resid_pre"), with_kwargs=True)
        layer.register_forward_hook(output_of(f"{p}.hook_resid_post"))
        layer.input_layernorm.register_forward_pre_hook(norm_input(f"{p}.ln1", eps))
        layer.post_attention_layernorm.register_forward_pre_hook(
            norm_input(f"{p}.ln1_post", eps))
        layer.post_attention_layernorm.register_forward_hook(output_of(f"{p}.hook_attn_out"))
        layer.pre_feedforward_layernorm.register_forward_pre_hook(norm_input(f"{p}.ln2", eps))
        layer.pre_feedforward_layernorm.register_forward_pre_hook(
            input_of(f"{p}.hook_resid_mid"), with_kwargs=True)
        layer.post_feedforward_layernorm.register_forward_pre_hook(
            norm_input(f"{p}.ln2_post", eps))
        layer.post_feedforward_layernorm.register_forward_hook(output_of(f"{p}.hook_mlp_out"))
        attn = layer.self_attn
        attn.q_proj.register_forward_hook(output_of(f"{p}.attn.hook_q", h))
        attn.k_proj.register_forward_hook(output_of(f"{p}.attn.hook_k", kv))
        attn.v_proj.register_forward_hook(output_of(f"{p}.attn.hook_v", kv))
        attn.q_norm.register_forward_pre_hook(norm_input(f"{p}.attn.q_norm", eps, True))
        attn.k_norm.register_forward_pre_hook(norm_input(f"{p}.attn.k_norm", eps, True))
        attn.q_norm.register_forward_hook(norm_output(f"{p}.q_normed"))
        attn.k_norm.register_forward_hook(norm_output(f"{p}.k_normed"))
        attn.o_proj.register_forward_pre_hook(input_of(f"{p}.attn.hook_z", h), with_kwargs=True)
        mlp = layer.mlp
        mlp.gate_proj.register_forward_hook(output_of(f"{p}.mlp.hook_pre"))
        mlp.up_proj.register_forward_hook(output_of(f"{p}.mlp.hook_pre_linear"))
        mlp.down_proj.register_forward_pre_hook(input_of(f"{p}.mlp.hook_post"), with_kwargs=True)
    with torch.no_grad():
        result = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True
        )
        embed = captured["hook_embed"]
        rope = {
            "sliding_attention": model.model.rotary_emb_local(embed, positions),
            "full_attention": model.model.rotary_emb(embed, positions),
        }
        for i in range(config.num_hidden_layers):
            p = f"blocks.{i}"
            captured[f"{p}.hook_mlp_in"] = captured[f"{p}.hook_resid_mid"]
            cos, sin = rope[config.layer_types[i]]
            q = captured.pop(f"{p}.q_normed").transpose(1, 2)
            k = captured.pop(f"{p}.k_normed").transpose(1, 2)
            rot_q, rot_k = apply_rotary_pos_emb(q, k, cos, sin)
            captured[f"{p}.attn.hook_rot_q"] = rot_q.transpose(1, 2)
            captured[f"{p}.attn.hook_rot_k"] = rot_k.transpose(1, 2)
            captured[f"{p}.attn.hook_pattern"] = result.attentions[i]
        for name, (x, eps) in norm_inputs.items():
            scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            captured[f"{name}.hook_scale"] = scale
            captured[f"{name}.hook_normalized"] = x / scale
    captured["unembed.hook_out"] = result.logits[:, -1:] if logits == "last" else result.logits
    real = mask.bool()
    tensors = {}
    for name, value in captured.items():
        value = value.double().clone()
        if name.endswith("hook_pattern"):
            value[~real[:, None, :, None].expand_as(value)] = 0.0
            value[~real[:, None, None, :].expand_as(value)] = 0.0
        elif value.shape[1] == t:
            value[~real] = 0.0
        tensors[name] = value.numpy()
    return tensors


def generate(model, rows, n):
    ids, mask = batch(rows)
    # Every step's greedy token, an end-of-sequence token included: no stopping.
    model.generation_config.eos_token_id = None
    out = {}
    for name, cache in [("tokens", True), ("recomputed", False)]:
        with torch.no_grad():
            tokens = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n,
                do_sample=False, use_cache=cache, pad_token_id=0,
            )
        out[name] = tokens[:, ids.shape[1]:].numpy()
    return out


def main():
    mode, model_dir, rows, path = sys.argv[1:5]
    rows = [[int(x) for x in row.split()] for row in rows.split(";")]
    model = load(model_dir)
    if mode == "points":
        tensors = points(model, rows, sys.argv[5] if len(sys.argv) > 5 else "all")
    else:
        tensors = generate(model, rows, int(sys.argv[5]))
    save_safetensors(path, tensors)


if __name__ == "__main__":
    main()
