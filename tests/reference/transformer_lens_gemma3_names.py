"""The hook names of TransformerLens's Gemma 3 270M, one per line.

    python transformer_lens_gemma3_names.py

TransformerLens builds the model from its own Gemma 3 configuration; the Hugging Face
configuration it reads from the hub is given here instead (Gemma 3 270M's, offline),
and the model is built with random weights: only its hook points are listed (with
`use_hook_tokens`, as the side-by-side LLaMA run sets it).
"""

import transformers
from transformers import Gemma3TextConfig

HF_CONFIG = Gemma3TextConfig(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256,
    max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256,
    rope_theta=1e6, rope_local_base_freq=1e4,
)
HF_CONFIG.architectures = ["Gemma3ForCausalLM"]
transformers.AutoConfig.from_pretrained = lambda *args, **kwargs: HF_CONFIG

from transformer_lens import HookedTransformer  # noqa: E402
from transformer_lens.loading_from_pretrained import get_pretrained_model_config  # noqa: E402


def main():
    config = get_pretrained_model_config("google/gemma-3-270m", n_ctx=64)
    config.tokenizer_name = None
    config.use_hook_tokens = True
    for name in HookedTransformer(config).hook_dict:
        print(name)


if __name__ == "__main__":
    main()
