"""Greedy generation with an SAE spliced in, as SAELens's HookedSAETransformer runs it.

    python saelens_generate.py HF_DIR SAE_DIR HOOK "1 2 3" N [--clamp K:V]

HF_DIR is a Hugging Face LLaMA-family directory, built into a HookedSAETransformer exactly
as transformer_lens_run.py builds its HookedTransformer (TransformerLens's own weight
conversion, unprocessed weights). The SAE in SAE_DIR (`SAE.load_from_disk`) is attached
at HOOK with its error term, so that alone it leaves the model's output unchanged;
N tokens are generated greedily, each from a full forward pass over the whole sequence
(no KV cache); with `--clamp K:V` a second time with latent K set to V at every position
(a hook on HOOK.hook_sae_acts_post). Prints one JSON line: {"tokens": [the prompt's ids,
then the generated ids], "clamped": [the same with the clamp]}.
"""

import argparse
import json
import os
import sys

import torch
from sae_lens import SAE, HookedSAETransformer
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from transformer_lens_run import hooked  # noqa: E402


def model_with_sae(model_dir, sae_dir, hook):
    """The HookedSAETransformer of `model_dir` with the SAE of `sae_dir` at `hook`."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model = hooked(hf, config, HookedSAETransformer)
    sae = SAE.load_from_disk(sae_dir, device="cpu", dtype="float32")
    sae.cfg.metadata.hook_name = hook
    model.add_sae(sae, use_error_term=True)
    if hook not in model.acts_to_saes:
        sys.exit(f"no hook point {hook}")
    return model


def clamp(latent, value):
    """A hook that sets `latent` to `value` at every position."""
    def set_latent(acts, hook):  # noqa: ARG001 (TransformerLens passes the hook point)
        acts[..., latent] = value
        return acts
    return set_latent


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("sae")
    parser.add_argument("hook")
    parser.add_argument("prompt")
    parser.add_argument("n", type=int)
    parser.add_argument("--clamp")
    args = parser.parse_args()
    model = model_with_sae(args.model, args.sae, args.hook)
    prompt = torch.tensor([[int(x) for x in args.prompt.split()]])
    out = {"tokens": greedy(model, prompt, args.n)}
    if args.clamp:
        latent, value = args.clamp.split(":")
        model.add_hook(f"{args.hook}.hook_sae_acts_post", clamp(int(latent), float(value)))
        out["clamped"] = greedy(model, prompt, args.n)
    print(json.dumps(out))


def greedy(model, tokens, n):
    """`tokens` and `n` tokens after them, each the argmax of a full forward pass."""
    with torch.no_grad():
        for _ in range(n):
            next_token = model(tokens)[0, -1].argmax()
            tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    return tokens[0].tolist()


if __name__ == "__main__":
    main()
