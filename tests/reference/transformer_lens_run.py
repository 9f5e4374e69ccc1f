"""Every hook point of a LLaMA-family model as TransformerLens 2.x computes it.

    python transformer_lens_run.py HF_DIR "1 2 3;4 5 6" OUT.safetensors

HF_DIR is a Hugging Face model directory (config.json, model.safetensors); the model is
loaded with `transformers`, converted with TransformerLens's own LLaMA weight conversion,
and run with `run_with_cache` without any weight processing (no folded norms, no centred
weights). Two runs: one with the opt-in `attn.hook_result`, `hook_mlp_in` and
`hook_tokens`, one with the split q/k/v inputs (which make TransformerLens apply ln1 to
each head's copy, so its ln1 hooks take other shapes there and come from the first run).
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

sys.path.insert(0, os.path.dirname(__file__))
from llama_ref import save_safetensors  # noqa: E402


def hooked(hf, config, model_class=HookedTransformer, **flags):
    """A `model_class` (a HookedTransformer) of `hf`'s weights, unprocessed, with `flags` set."""
    n_heads = config["num_attention_heads"]
    d_head = config.get("head_dim") or config["hidden_size"] // n_heads
    cfg = HookedTransformerConfig(
        d_model=config["hidden_size"],
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=config.get("num_key_value_heads", n_heads),
        d_mlp=config["intermediate_size"],
        n_layers=config["num_hidden_layers"],
        n_ctx=min(config.get("max_position_embeddings", 2048), 2048),
        d_vocab=config["vocab_size"],
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        eps=config["rms_norm_eps"],
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=config.get("rope_theta", 10000.0),
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=False,
        dtype=torch.float32,
        device="cpu",
        **flags,
    )
    model = model_class(cfg)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()


def main():
    model_dir, tokens, out = sys.argv[1:4]
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    tokens = torch.tensor([[int(x) for x in row.split()] for row in tokens.split(";")])
    tensors = {}
    with torch.no_grad():
        model = hooked(hf, config, use_attn_result=True, use_hook_mlp_in=True, use_hook_tokens=True)
        logits, cache = model.run_with_cache(tokens)
        tensors.update({name: value.double().numpy() for name, value in cache.items()})
        tensors["unembed.hook_out"] = logits.double().numpy()
        model = hooked(hf, config, use_split_qkv_input=True)
        _, cache = model.run_with_cache(tokens)
        for name, value in cache.items():
            if name.endswith(("hook_q_input", "hook_k_input", "hook_v_input")):
                tensors[name] = value.double().numpy()
    save_safetensors(out, tensors)
    print(f"wrote {len(tensors)} tensors to {out}")


if __name__ == "__main__":
    main()
