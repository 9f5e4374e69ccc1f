"""Sparse autoencoders made, saved, loaded and run by SAELens 6.x itself.

    python saelens_sae.py train DATASET_DIR COLUMN OUT_DIR --steps N [--d-sae D] [--seed S]

trains a standard (ReLU, L1) SAE on the cached activations in column COLUMN of the
Hugging Face dataset DATASET_DIR (rows [context, d_in]; SAELens's `ActivationsStore` reads
them and its `SAETrainer` trains, on the CPU, without a language model), and saves the
inference SAE as SAELens's training runner does (`save_inference_model`: cfg.json and
sae_weights.safetensors), with COLUMN as its hook name;

    python saelens_sae.py random ARCH D_IN D_SAE OUT_DIR --seed S [--k K]
        [--apply-b-dec-to-input] [--normalize-activations none|layer_norm|constant_norm_rescale]
        [--rescale-acts-by-decoder-norm]

saves (`save_model`) an inference SAE of architecture ARCH (standard, topk or jumprelu)
whose every parameter is drawn from a seeded generator, scaled for inputs of about unit
size per component;

    python saelens_sae.py encode SAE_DIR ACTS.safetensors OUT.safetensors

loads an SAE (`SAE.load_from_disk`, CPU, float32), runs it on the tensor "acts" ([n, d_in]
or [b, t, d_in]) and writes "acts_pre" (hook_sae_acts_pre), "acts_post" (`encode`),
"recons" (`decode` of acts_post) and "output" (the forward pass).
"""

import argparse
import math

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


def random_sae(args):
    """An inference SAE of `args.arch` with every parameter drawn from `args.seed`."""
    common = dict(
        d_in=args.d_in,
        d_sae=args.d_sae,
        apply_b_dec_to_input=args.apply_b_dec_to_input,
        normalize_activations=args.normalize_activations,
    )
    if args.arch == "standard":
        sae = StandardSAE(StandardSAEConfig(**common))
    elif args.arch == "topk":
        sae = TopKSAE(TopKSAEConfig(
            **common, k=args.k, rescale_acts_by_decoder_norm=args.rescale_acts_by_decoder_norm))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    g = torch.Generator().manual_seed(args.seed)
    d_in, d_sae = args.d_in, args.d_sae
    # Pre-activations of about unit size, decoder rows of norms between 0.5 and 2.
    params = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in),
        "b_enc": 0.2 * torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_in)
        * (0.5 + 1.5 * torch.rand(d_sae, 1, generator=g)),
        "b_dec": 0.2 * torch.randn(d_in, generator=g),
    }
    if args.arch == "jumprelu":
        params["threshold"] = 0.1 + 0.6 * torch.rand(d_sae, generator=g)
    sae.load_state_dict(params)
    sae.save_model(args.out)
    print(f"saved a random {args.arch} SAE to {args.out}")


def encode(args):
    sae = SAE.load_from_disk(args.sae, device="cpu", dtype="float32")
    acts = load_file(args.acts)["acts"].float()
    with torch.no_grad():
        output, cache = sae.run_with_cache(acts, names_filter="hook_sae_acts_pre")
        acts_post = sae.encode(acts)
        recons = sae.decode(acts_post)
    save_file({
        "acts_pre": cache["hook_sae_acts_pre"].contiguous(),
        "acts_post": acts_post.contiguous(),
        "recons": recons.contiguous(),
        "output": output.contiguous(),
    }, args.out)
    print(f"wrote {args.out}")


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
    p.add_argument("arch", choices=["standard", "topk", "jumprelu"])
    p.add_argument("d_in", type=int)
    p.add_argument("d_sae", type=int)
    p.add_argument("out")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--apply-b-dec-to-input", action="store_true")
    p.add_argument("--normalize-activations", default="none",
                   choices=["none", "layer_norm", "constant_norm_rescale"])
    p.add_argument("--rescale-acts-by-decoder-norm", action="store_true")
    p.set_defaults(run=random_sae)
    p = sub.add_parser("encode")
    p.add_argument("sae")
    p.add_argument("acts")
    p.add_argument("out")
    p.set_defaults(run=encode)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
