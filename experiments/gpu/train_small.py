"""Does NSA learn? A small Llama decoder trained from scratch on bytes of the Python standard library,
with dense, NSA and FSA attention from one seed and one data order (issue #16, FSA paper Figure 11).

    OUT=./out python -m experiments.gpu.train_small [--backends dense,nsa,fsa] [--steps 1000]
    python -m experiments.gpu.train_small --tiny            # CPU smoke test (seconds, fp32)
    python -m experiments.gpu.train_small --plot-only       # redraw from $OUT/train_small_*.csv

Model: LlamaForCausalLM, 6 layers, hidden 512, 8 query / 2 KV heads, d = 64, MLP 1536, vocab 256
(bytes), random init from seed; the attention swapped by nsa_baseline.models.use_nsa_attention
(NSA: kernel 32 / stride 16, (BS, T) = (64, 16), window 512). Data: the .py files under
sysconfig.get_paths()["stdlib"] (site-packages excluded), sorted by path, concatenated as bytes; the
last 5% is held out. Each step takes --batch windows of --context + 1 bytes at offsets drawn from a
generator seeded by --seed: every backend sees the same bytes in the same order.
bf16: the forward and backward run in bf16 (model weights cast to bf16: the kernels see bf16 as in
the benchmarks); fp32 master weights and AdamW states (the bf16 grads are copied to the fp32
masters, AdamW steps there, the result is copied back). AdamW (0.9, 0.95), wd 0.1, lr 1e-3 with 50
warmup steps and cosine decay to 1e-4, grad-norm clip 1.0.
Writes $OUT/train_small_<backend>.csv (step, train loss averaged over the last --log-every steps,
held-out loss every --eval-every steps and at the end, lr, tokens, seconds; GPU, torch, Triton,
commit, corpus bytes on every row) and $OUT/train_small.png (loss vs step, one line per backend).
Each backend is one run: they can go in separate calls (same seed and data order).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.gpu.provenance import out_dir, require_cuda, run_meta, write_rows

FULL = dict(layers=6, hidden=512, heads=8, kv_heads=2, head_dim=64, mlp=1536, context=8192, batch=4,
            nsa=dict(kernel_size=32, kernel_stride=16, block_size=64, topk=16, window_size=512))
# CPU smoke test: the Triton interpreter runs fp32 only (its bf16 tl.dot is broken).
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=96, context=48, batch=2,
            nsa=dict(kernel_size=8, kernel_stride=4, block_size=16, topk=3, window_size=16))
START = time.time()


def corpus(max_bytes: int | None = None) -> torch.Tensor:
    """uint8 [bytes] of the standard library's .py sources (sorted paths, site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    chunks, total = [], 0
    for p in files:
        data = p.read_bytes()
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def windows(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """int64 [batch, length]: windows at random offsets (the same for every backend given the generator)."""
    starts = torch.randint(0, data.numel() - length, (batch,), generator=gen)
    return torch.stack([data[s:s + length] for s in starts.tolist()]).long()


def build(size: dict, backend: str, seed: int, device, dtype):
    import transformers

    from nsa_baseline.models import use_nsa_attention

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=size["hidden"], intermediate_size=size["mlp"], num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"], head_dim=size["head_dim"],
        max_position_embeddings=size["context"], tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(seed + 1)  # gates and compression weights: the same for NSA and FSA
    use_nsa_attention(model, backend=backend, **({} if backend == "dense" else size["nsa"]))
    return model.to(device=device, dtype=dtype)


def lr_at(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def fp32_adamw(model, lr: float) -> tuple[list[torch.Tensor], torch.optim.AdamW]:
    """fp32 master copies of the (bf16) weights and the AdamW that steps them."""
    master = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    return master, torch.optim.AdamW(master, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def adamw_step(model, master: list[torch.Tensor], opt, lr: float) -> None:
    """One optimizer step after backward: the model's grads go to the fp32 masters (norm clipped to
    1), AdamW steps there at `lr`, the result is copied back into the model."""
    for p, m in zip(model.parameters(), master):
        m.grad = p.grad.float()
        p.grad = None
    torch.nn.utils.clip_grad_norm_(master, 1.0)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, m in zip(model.parameters(), master):
            p.copy_(m)


def cpu_meta() -> dict:
    """The provenance columns of a CPU smoke run (run_meta needs CUDA)."""
    from experiments.rowtools import git_commit
    import triton

    return dict(gpu="none (CPU)", torch=torch.__version__, triton=triton.__version__, git_commit=git_commit())


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model, held: torch.Tensor, size: dict, batches: int, device) -> float:
    gen = torch.Generator().manual_seed(12345)  # fixed held-out windows
    return sum(loss_of(model, windows(held, size["batch"], size["context"] + 1, gen).to(device)).item()
               for _ in range(batches)) / batches


def train(backend: str, args, size: dict, device, dtype, meta: dict) -> list[dict]:
    data = corpus(args.max_bytes)
    split = int(data.numel() * 0.95)
    train_data, held = data[:split], data[split:]
    model = build(size, backend, args.seed, device, dtype)
    master, opt = fp32_adamw(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    rows, window, t0 = [], [], time.time()
    for step in range(args.steps):
        ids = windows(train_data, size["batch"], size["context"] + 1, gen).to(device)
        loss = loss_of(model, ids)
        loss.backward()
        adamw_step(model, master, opt, lr_at(step, args.steps, args.lr))
        window.append(loss.item())
        last = step == args.steps - 1
        if (step + 1) % args.log_every == 0 or last:
            row = dict(backend=backend, step=step + 1, train_loss=f"{sum(window) / len(window):.4f}",
                       lr=f"{lr_at(step, args.steps, args.lr):.2e}", tokens=(step + 1) * size["batch"] * size["context"],
                       seconds=f"{time.time() - t0:.1f}", eval_loss="")
            if (step + 1) % args.eval_every == 0 or last:
                row["eval_loss"] = f"{eval_loss(model, held, size, args.eval_batches, device):.4f}"
            rows.append(row)
            window = []
            print(f"  [{time.time() - START:6.0f} s] " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    meta = dict(meta, corpus_bytes=data.numel(), seed=args.seed, dtype=str(dtype).split(".")[-1],
                **{k: v for k, v in size.items() if k != "nsa"}, **size["nsa"])
    write_rows(args.out / f"train_small_{backend}.csv", rows, meta)
    return rows


def plot(out: Path) -> Path | None:
    """train_small.png from every $OUT/train_small_<backend>.csv: loss vs step, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(out.glob("train_small_*.csv"))
    if not files:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for f in files:
        with open(f) as fh:
            rows = list(csv.DictReader(fh))
        name = rows[0]["backend"]
        line, = ax.plot([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows], label=f"{name} (train)")
        ev = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r["eval_loss"]]
        if ev:
            ax.plot(*zip(*ev), "o--", color=line.get_color(), ms=3, label=f"{name} (held-out)")
    meta = rows[0]
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(f"{meta['layers']}-layer Llama, {meta['context']}-byte context, stdlib bytes\n"
                 f"{meta['dtype']} on {meta['gpu']}, commit {meta['git_commit']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "train_small.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default=None, help="dense, nsa, fsa, auto, torch (default dense,nsa,fsa; "
                                                    "--tiny: dense,torch)")
    ap.add_argument("--steps", type=int, default=None, help="default 1000 (--tiny: 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--max-bytes", type=int, default=None, help="read only the first files, about this many bytes")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, fp32, a few steps")
    ap.add_argument("--plot-only", action="store_true", help="redraw train_small.png from the CSVs in $OUT")
    args = ap.parse_args()
    args.out = out_dir()
    if args.plot_only:
        print(f"wrote {plot(args.out)}")
        return 0
    if args.tiny:
        size, device, dtype = TINY, "cpu", torch.float32
        args.steps = args.steps or 3
        args.backends = args.backends or "dense,torch"
        args.max_bytes = args.max_bytes or 200_000
        args.eval_batches, args.log_every = 1, 1
        meta = cpu_meta()
    else:
        require_cuda()
        size, device, dtype = FULL, "cuda", torch.bfloat16
        args.steps = args.steps or 1000
        args.backends = args.backends or "dense,nsa,fsa"
        meta = run_meta()
    print(f"train_small: {args.backends} x {args.steps} steps, {dtype}, on {meta['gpu']}, commit {meta['git_commit']}",
          flush=True)
    final = {}
    for backend in args.backends.split(","):
        rows = train(backend, args, size, device, dtype, meta)
        final[backend] = rows[-1]
    path = plot(args.out)
    for backend, row in final.items():
        print(f"{backend:6s} final train loss {row['train_loss']}  held-out {row['eval_loss']}")
    print(f"wrote {args.out}/train_small_*.csv and {path} in {time.time() - START:.0f} s")
    return 0 if all(math.isfinite(float(r["train_loss"])) for r in final.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
