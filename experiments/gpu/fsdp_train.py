"""FSDP2 training of the small NSA decoder of train_small over N processes, and the check that N
processes train exactly like one (issue #16).

    torchrun --nproc_per_node=2 -m experiments.gpu.fsdp_train [--backend fsa] [--steps 20]
    torchrun --nproc_per_node=1 -m experiments.gpu.fsdp_train [same options]     # the one-GPU run
    python -m experiments.gpu.fsdp_train --compare $OUT/fsdp_train_w2.csv $OUT/fsdp_train_w1.csv
    torchrun --nproc_per_node=2 -m experiments.gpu.fsdp_train --tiny --device cpu   # CPU, gloo, seconds

Model: train_small's LlamaForCausalLM (6 layers, hidden 512, 8 / 2 heads, d = 64, bytes; --tiny: its
CPU size) with NSA swapped in (use_nsa_attention; --tiny default backend torch, the reference), fp32
weights from --seed, sharded with torch.distributed.fsdp.fully_shard per decoder layer and at the
root over a 1-D mesh of all ranks (NCCL on cuda, gloo on cpu); MixedPrecisionPolicy: bf16 compute
(param_dtype), fp32 gradient reduction, fp32 sharded master weights and AdamW states. AdamW (0.9,
0.95), wd 0.1, train_small's lr schedule, grad-norm clip 1.0. Data: train_small's corpus and windows;
each step draws the global --batch windows from one generator seeded by --seed (the same on every
rank and for every N) and rank r trains on rows [r * B / N, (r + 1) * B / N): with the per-rank mean
loss and FSDP's gradient average that is the gradient of the global batch's mean loss, as on one GPU.
Rank 0 writes $OUT/fsdp_train_w<N>.csv: step, loss (mean over ranks), grad norm, lr, seconds, and
GPU, torch, Triton, commit, world size, backend on every row.
--compare A B: exit 0 when both ran the same steps and every step's loss of A is within --atol +
--rtol * |loss of B| (default 0 + 1%: the losses are fp32 means of bf16 logits; N ranks run other GEMM
shapes and reduce the gradients in another order, which moves bf16 results by its unit roundoff 2^-8
= 0.4% per element, far less in a mean over thousands of tokens, and drifts over the steps: the CPU
tiny run differs by ~1e-5 relative after 3 steps), else 1; prints the largest difference.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from datetime import timedelta

import torch
import torch.nn.functional as F

from experiments.gpu.provenance import out_dir, require_cuda, write_rows
from experiments.gpu.train_small import FULL, TINY, build, corpus, lr_at, windows

BF16 = torch.bfloat16


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default=None, help="dense, nsa, fsa, auto, torch (default fsa; --tiny: torch)")
    ap.add_argument("--steps", type=int, default=None, help="default 20 (--tiny: 3)")
    ap.add_argument("--batch", type=int, default=None, help="global windows per step (default 8; --tiny: 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-bytes", type=int, default=None, help="read only the first files, about this many bytes")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="train_small's CPU size (seconds)")
    ap.add_argument("--compare", nargs=2, metavar=("CSV", "REFERENCE_CSV"), help="check losses, run nothing")
    ap.add_argument("--atol", type=float, default=0.0)
    ap.add_argument("--rtol", type=float, default=0.01)
    args = ap.parse_args(argv)
    size = dict(TINY if args.tiny else FULL)
    size["batch"] = args.batch or (4 if args.tiny else 8)
    args.size = size
    args.steps = args.steps or (3 if args.tiny else 20)
    args.backend = args.backend or ("torch" if args.tiny else "fsa")
    if args.tiny and args.max_bytes is None:
        args.max_bytes = 200_000
    for key in ("steps", "batch"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            ap.error(f"--{key} must be a positive integer")
    return args


def rank_rows(batch: int, world: int, rank: int) -> slice:
    """The rows of the global batch that `rank` trains on; ValueError unless batch splits evenly."""
    if batch % world:
        raise ValueError(f"--batch={batch} must be a multiple of the world size {world} (equal shares keep "
                         "the mean of the ranks' mean losses equal to the global mean)")
    share = batch // world
    return slice(rank * share, (rank + 1) * share)


def compare(path: str, ref: str, atol: float, rtol: float) -> tuple[bool, str]:
    """Whether the losses of `path` match `ref` step by step within atol + rtol * |ref|, and why."""
    def losses(p):
        with open(p) as f:
            return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}

    a, b = losses(path), losses(ref)
    if not a or sorted(a) != sorted(b):
        return False, f"steps differ: {sorted(a)} vs {sorted(b)}"
    worst = max(a, key=lambda s: abs(a[s] - b[s]) / max(atol + rtol * abs(b[s]), 1e-30))
    ok = all(abs(a[s] - b[s]) <= atol + rtol * abs(b[s]) for s in a)
    return ok, (f"{'match' if ok else 'MISMATCH'}: largest difference at step {worst}: {a[worst]:.5f} vs "
                f"{b[worst]:.5f} (tolerance {atol} + {rtol} * |reference|), {len(a)} steps")


def setup(device: str):
    """(rank, world, mesh): the process group from torchrun's environment, or one process alone."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if "RANK" not in os.environ:  # plain python: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(minutes=5))
    return dist.get_rank(), dist.get_world_size(), init_device_mesh(device, (dist.get_world_size(),))


def train(args) -> list[dict]:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    rank, world, mesh = setup(args.device)
    size, device = args.size, torch.device(args.device, torch.cuda.current_device() if args.device == "cuda" else 0)
    mine = rank_rows(size["batch"], world, rank)
    data = corpus(args.max_bytes)
    train_data = data[:int(data.numel() * 0.95)]
    model = build(size, args.backend, args.seed, device, torch.float32)  # the same weights on every rank
    policy = MixedPrecisionPolicy(param_dtype=BF16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    rows, t0 = [], time.time()
    for step in range(args.steps):
        ids = windows(train_data, size["batch"], size["context"] + 1, gen)[mine].to(device)
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)  # SUM (gloo has no AVG)
        rows.append(dict(step=step + 1, loss=f"{total.item() / world:.6f}", grad_norm=f"{norm.item():.5f}",
                         lr=f"{lr_at(step, args.steps, args.lr):.3e}", seconds=f"{time.time() - t0:.2f}"))
        if rank == 0:
            print("  " + " ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    # every rank done communicating before teardown: a gloo rank that tore down while its peer was still
    # in the last collective aborted ("terminate called without an active exception", seen once in CI)
    dist.barrier()
    dist.destroy_process_group()
    return rows if rank == 0 else []


def meta(args, world: int) -> dict:
    import triton

    from experiments.rowtools import git_commit

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none (CPU)"
    return dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, git_commit=git_commit(),
                world_size=world, backend=args.backend, seed=args.seed, batch=args.size["batch"],
                context=args.size["context"], layers=args.size["layers"], hidden=args.size["hidden"],
                param_dtype="bfloat16", reduce_dtype="float32")


def main(argv=None) -> int:
    args = parse(argv)
    if args.compare:
        ok, line = compare(*args.compare, args.atol, args.rtol)
        print(line)
        return 0 if ok else 1
    if args.device == "cuda":
        require_cuda()
    try:
        rank_rows(args.size["batch"], int(os.environ.get("WORLD_SIZE", "1")), 0)
    except ValueError as err:
        sys.exit(str(err))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = train(args)
    if rows:
        path = out_dir() / f"fsdp_train_w{world}.csv"
        write_rows(path, rows, meta(args, world))
        print(f"wrote {path}: {len(rows)} steps on {world} process(es), final loss {rows[-1]['loss']}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without interpreter finalization: under load a gloo worker thread that still held a finished
    # collective's tensors aborted the process at exit ("terminate called without an active exception",
    # SIGABRT after the CSV was written; twice in CI on 2 cores). Everything is written and flushed here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
