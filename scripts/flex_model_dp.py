"""Median forward pass of the Python FlexModel (flex-model 0.1.0 on PyPI) with data
parallelism over two gloo processes of one thread each, as one JSON line.

    python flex_model_dp.py HF_DIR --batch 4 --seq 128 --iters 5 [--resid-post]

Each process loads the Hugging Face model (float32, eager attention) from HF_DIR, wraps
it in `FlexModel(..., data_parallel_size=2)` and runs its half of the same random batch
that `hf_eager_forward.py` draws; with `--resid-post` a `HookFunction` on every decoder
layer's output (TransformerLens's `hook_resid_post`) gathers it across the processes.
A pass is timed on rank 0 from a barrier before it to a barrier after it, so that it
lasts as long as the slower process. Only loopback is contacted. flex-model 0.1.0 makes
one process group with NCCL, hard-coded; on the CPU this script makes it with gloo.
"""

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rank, args, port):
    import flex_model.distributed.distributed_state as state
    from flex_model.core import FlexModel, HookFunction

    # flex-model 0.1.0 makes its one sub-group with NCCL, which needs GPUs: on the CPU
    # the same group over gloo.
    state._initialize_subset_torch_distributed = lambda ranks: dist.new_group(
        ranks=ranks, backend="gloo"
    )

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    mine = ids.chunk(WORLD)[rank]
    activations = {}
    flex = FlexModel(model, activations, data_parallel_size=WORLD)
    if args.resid_post:
        for layer in range(model.config.num_hidden_layers):
            flex.register_forward_hook(
                HookFunction(module_name=f"model.layers.{layer}", expected_shape=(None, None, None))
            )
    times = []
    with torch.inference_mode():
        for i in range(args.iters + 1):
            dist.barrier()
            start = time.perf_counter()
            flex(mine)
            dist.barrier()
            elapsed = (time.perf_counter() - start) * 1e3
            activations.clear()
            if i > 0:
                times.append(elapsed)
    if rank == 0:
        print(json.dumps({
            "runner": "flex_model dp=2 gloo" + (" resid_post" if args.resid_post else ""),
            "torch": torch.__version__,
            "batch": args.batch,
            "seq": args.seq,
            "iters": args.iters,
            "median_ms": statistics.median(times),
            "min_ms": min(times),
        }), flush=True)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--resid-post", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(run, args=(args, free_port()), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
