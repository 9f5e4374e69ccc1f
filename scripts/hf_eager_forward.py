"""Median forward pass of Hugging Face transformers in eager mode, as one JSON line.

    python hf_eager_forward.py HF_DIR --batch 4 --seq 128 --iters 5 --threads 2
    python hf_eager_forward.py HF_DIR --device cuda --dtype bf16

On a GPU every timed pass ends with `torch.cuda.synchronize()`.

HF_DIR is a Hugging Face directory (the `gguf_to_hf` example writes one from the GGUF
that `flexmodel` reads: the same weights, dequantized to float32). The model runs in
float32 with `attn_implementation="eager"` under `torch.inference_mode()`, computing the
logits of every position, on `--threads` intra-op threads (one inter-op thread), over
random token ids; one warm-up pass, then `--iters` timed passes.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    args = parser.parse_args()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    device = torch.device(args.device)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    try:  # transformers >= 4.56 names it `dtype`; older ones only `torch_dtype`
        model = AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=dtype, attn_implementation="eager"
        )
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(
            args.model_dir, torch_dtype=dtype, attn_implementation="eager"
        )
    model = model.eval().to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    ids = ids.to(device)
    times = []
    with torch.inference_mode():
        for i in range(args.iters + 1):
            synchronize()
            start = time.perf_counter()
            logits = model(input_ids=ids).logits
            synchronize()
            elapsed = (time.perf_counter() - start) * 1e3
            assert logits.shape == (args.batch, args.seq, model.config.vocab_size)
            if i > 0:
                times.append(elapsed)
    print(json.dumps({
        "runner": "transformers-eager",
        "torch": torch.__version__,
        "threads": args.threads,
        "device": args.device,
        "model_dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "iters": args.iters,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
    }))


if __name__ == "__main__":
    main()
