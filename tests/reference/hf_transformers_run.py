"""Hook points of a LLaMA-family model as Hugging Face transformers itself computes them.

    python hf_transformers_run.py HF_DIR "1 2 3;4 5" OUT.safetensors

HF_DIR is a Hugging Face model directory; the model is loaded with `transformers`
(`AutoModelForCausalLM`, float32, eager attention), so its own RoPE scalings
(`rope_scaling`) and sliding-window masks compute every value. Rows of unequal length are
left-padded with an attention mask and position ids that count real tokens, as
`generate` makes them. Values are taken with forward hooks on transformers' modules and
written under FlexModel-rs's hook names; where a row is padding, every value is zero (as
FlexModel-rs's captures are), and a pattern's padded queries and keys are zero too.
"""

import os
import sys

import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

sys.path.insert(0, os.path.dirname(__file__))
from llama_ref import save_safetensors  # noqa: E402


def main():
    model_dir, rows, out = sys.argv[1:4]
    rows = [[int(x) for x in row.split()] for row in rows.split(";")]
    t = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (t - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    config = model.config
    h, kv = config.num_attention_heads, config.num_key_value_heads
    dh = getattr(config, "head_dim", None) or config.hidden_size // h
    b = len(rows)
    captured = {}

    def output_of(name, heads=None):
        def hook(module, inputs, output):
            value = output[0] if isinstance(output, tuple) else output
            captured[name] = value.reshape(b, t, heads, dh) if heads else value
        return hook

    def input_of(name, heads=None):
        def hook(module, args, kwargs):
            value = args[0] if args else kwargs["hidden_states"]
            captured[name] = value.reshape(b, t, heads, dh) if heads else value
        return hook

    model.model.embed_tokens.register_forward_hook(output_of("hook_embed"))
    for i, layer in enumerate(model.model.layers):
        p = f"blocks.{i}"
        layer.register_forward_pre_hook(input_of(f"{p}.hook_resid_pre"), with_kwargs=True)
        layer.register_forward_hook(output_of(f"{p}.hook_resid_post"))
        attn = layer.self_attn
        attn.q_proj.register_forward_hook(output_of(f"{p}.attn.hook_q", h))
        attn.k_proj.register_forward_hook(output_of(f"{p}.attn.hook_k", kv))
        attn.v_proj.register_forward_hook(output_of(f"{p}.attn.hook_v", kv))
        attn.o_proj.register_forward_pre_hook(input_of(f"{p}.attn.hook_z", h), with_kwargs=True)
        attn.o_proj.register_forward_hook(output_of(f"{p}.hook_attn_out"))
        mlp = layer.mlp
        mlp.gate_proj.register_forward_hook(output_of(f"{p}.mlp.hook_pre"))
        mlp.up_proj.register_forward_hook(output_of(f"{p}.mlp.hook_pre_linear"))
        mlp.down_proj.register_forward_pre_hook(input_of(f"{p}.mlp.hook_post"), with_kwargs=True)
        mlp.register_forward_hook(output_of(f"{p}.hook_mlp_out"))
    with torch.no_grad():
        result = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True
        )
        # The rotated queries and keys, with transformers' own rotary embedding (its
        # scaling, at these positions) and rotation.
        cos, sin = model.model.rotary_emb(captured["hook_embed"], positions)
        for i in range(config.num_hidden_layers):
            p = f"blocks.{i}.attn"
            q, k = captured[f"{p}.hook_q"], captured[f"{p}.hook_k"]
            rot_q, rot_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            captured[f"{p}.hook_rot_q"] = rot_q.transpose(1, 2)
            captured[f"{p}.hook_rot_k"] = rot_k.transpose(1, 2)
            captured[f"{p}.hook_pattern"] = result.attentions[i]
    captured["unembed.hook_out"] = result.logits
    real = mask.bool()
    tensors = {}
    for name, value in captured.items():
        value = value.double().clone()
        if name.endswith("hook_pattern"):
            value[~real[:, None, :, None].expand_as(value)] = 0.0
            value[~real[:, None, None, :].expand_as(value)] = 0.0
        else:
            value[~real] = 0.0
        tensors[name] = value.numpy()
    save_safetensors(out, tensors)


if __name__ == "__main__":
    main()
