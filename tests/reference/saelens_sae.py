"""Sparse autoencoders made, saved, loaded and run by SAELens 6.x itself.

    python saelens_sae.py train DATASET_DIR COLUMN OUT_DIR --steps N [--d-sae D] [--seed S]

trains a standard (ReLU, L1) SAE on the cached activations in column COLUMN of the
Hugging Face dataset DATASET_DIR (rows [context, d_in]; SAELens's `ActivationsStore` reads
them and its `SAETrainer` trains, on the CPU, without a language model), and saves the
inference SAE as SAELens's training runner does (`save_inference_model`: cfg.json and
sae_weights.safetensors), with COLUMN as its hook name;

    python saelens_sae.py random SPECS.json

saves (`save_model`) the inference SAEs a JSON list describes, each
`{"out": DIR, "arch": "standard"|"topk"|"jumprelu", "d_in": N, "d_sae": N, "seed": S}`
with optionally "k" (8), "apply_b_dec_to_input" (false), "normalize_activations" ("none",
"layer_norm", "constant_norm_rescale") and "rescale_acts_by_decoder_norm" (false), every
parameter drawn from its seed, scaled for inputs of about unit size per component;

    python saelens_sae.py encode ACTS.safetensors OUT_DIR SAE_DIR...

loads each SAE (`SAE.load_from_disk`, CPU, float32), runs it on the tensor "acts" ([n,
d_in] or [b, t, d_in]) with its error term on, as `HookedSAETransformer` splices it, and
writes OUT_DIR/NAME.safetensors (NAME: the SAE's directory's name) with every `hook_sae_*`
of its pass (`run_with_cache`), "encode" (what `encode` returns) and "decode" (`decode` of
that).
"""

import argparse
import json
import math
import os
import sys

import datasets
import torch
from safetensors.torch import load_file, save_file
from sae_lens import (
    SAE,
    ActivationsStore,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    SAETrainer,
    StandardSAE,
    StandardSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.config import LoggingConfig, SAETrainerConfig

# Tokens per training step, the learning rate and the L1 coefficient (on activations that
# SAELens rescales to an average norm of sqrt(d_in) while training, then folds back).
BATCH_TOKENS = 512
LR = 1e-3
L1_COEFFICIENT = 5.0


def activations_store(directory, column):
    """SAELens's reader of cached activations: rows in order, shuffled in a mixing buffer."""
    dataset = datasets.load_from_disk(directory)
    context_size, d_in = dataset.features[column].shape
    return ActivationsStore(
        model=None,
        dataset=None,
        cached_activations_path=directory,
        streaming=False,
        hook_name=column,
        hook_head_index=None,
        context_size=context_size,
        d_in=d_in,
        n_batches_in_buffer=math.ceil(4 * BATCH_TOKENS / context_size),
        total_training_tokens=0,
        store_batch_size_prompts=max(1, min(dataset.num_rows, BATCH_TOKENS // context_size)),
        train_batch_size_tokens=BATCH_TOKENS,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )


def train(args):
    """A standard SAE trained by SAELens on `args.column` of `args.dataset`, saved."""
    torch.manual_seed(args.seed)
    store = activations_store(args.dataset, args.column)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(
        d_in=store.d_in,
        d_sae=args.d_sae or 2 * store.d_in,
        normalize_activations="expected_average_only_in",
        l1_coefficient=L1_COEFFICIENT,
    ))
    sae.cfg.metadata.hook_name = args.column
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=args.steps * BATCH_TOKENS,
            train_batch_size_samples=BATCH_TOKENS,
            lr=LR,
            lr_end=LR / 10,
            n_batches_for_norm_estimate=16,
            logger=LoggingConfig(log_to_wandb=False),
        ),
        sae=sae,
        data_provider=store,
    )
    trainer.fit().save_inference_model(args.out)
    print(f"trained {args.steps} steps: l0 {sae.cfg.metadata.l0:.1f}, saved to {args.out}")


def random_sae(spec):
    """An inference SAE as `spec` says (architecture, sizes, options) with every parameter
    drawn from its seed, saved to its `out`."""
    d_in, d_sae = spec["d_in"], spec["d_sae"]
    common = dict(
        d_in=d_in,
        d_sae=d_sae,
        apply_b_dec_to_input=spec.get("apply_b_dec_to_input", False),
        normalize_activations=spec.get("normalize_activations", "none"),
    )
    arch = spec["arch"]
    if arch == "standard":
        sae = StandardSAE(StandardSAEConfig(**common))
    elif arch == "topk":
        rescale = spec.get("rescale_acts_by_decoder_norm", False)
        sae = TopKSAE(TopKSAEConfig(**common, k=spec.get("k", 8),
                                    rescale_acts_by_decoder_norm=rescale))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    else:
        sys.exit(f"unknown architecture {arch!r}")
    g = torch.Generator().manual_seed(spec["seed"])
    # Pre-activations of about unit size, decoder rows of norms between 0.5 and 2.
    params = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in),
        "b_enc": 0.2 * torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_in)
        * (0.5 + 1.5 * torch.rand(d_sae, 1, generator=g)),
        "b_dec": 0.2 * torch.randn(d_in, generator=g),
    }
    if arch == "jumprelu":
        params["threshold"] = 0.1 + 0.6 * torch.rand(d_sae, generator=g)
    sae.load_state_dict(params)
    sae.save_model(spec["out"])
    print(f"saved a random {arch} SAE to {spec['out']}")


def random_saes(args):
    """Every SAE the JSON list of `args.specs` describes."""
    with open(args.specs) as f:
        for spec in json.load(f):
            random_sae(spec)


def encode(args):
    """Each SAE of `args.saes` run by SAELens on "acts" of `args.acts` with its error term
    on, as `HookedSAETransformer` runs a spliced SAE: every `hook_sae_*` of
    `run_with_cache`, and what `encode` and `decode` return, saved under those names in
    `args.out_dir`, one file per SAE named after its directory."""
    acts = load_file(args.acts)["acts"].float()
    for sae_dir in args.saes:
        sae = SAE.load_from_disk(sae_dir, device="cpu", dtype="float32")
        with torch.no_grad():
            # `decode` reads the normalization `encode` just stored: one after the other.
            encoded = sae.encode(acts)
            decoded = sae.decode(encoded)
            sae.use_error_term = True
            _, cache = sae.run_with_cache(acts, names_filter=lambda name: "hook_sae_" in name)
        tensors = {name: value.contiguous() for name, value in cache.items()}
        tensors["encode"] = encoded.contiguous()
        tensors["decode"] = decoded.contiguous()
        out = os.path.join(args.out_dir, os.path.basename(os.path.normpath(sae_dir)))
        save_file(tensors, out + ".safetensors")
        print(f"wrote {out}.safetensors: {sorted(tensors)}")


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("dataset")
    p.add_argument("column")
    p.add_argument("out")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--d-sae", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=train)
    p = sub.add_parser("random")
    p.add_argument("specs")
    p.set_defaults(run=random_saes)
    p = sub.add_parser("encode")
    p.add_argument("acts")
    p.add_argument("out_dir")
    p.add_argument("saes", nargs="+")
    p.set_defaults(run=encode)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
