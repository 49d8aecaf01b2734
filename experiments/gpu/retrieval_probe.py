"""Long-context retrieval probe (issue #16): a key-value "needle" planted early in a 16K-byte context
and asked for at the end; the small Llama of train_small trained briefly with dense, NSA and FSA
attention from one seed and one data order, then scored on fresh 16K examples per needle depth.

    OUT=./out python -m experiments.gpu.retrieval_probe [--backends dense,nsa,fsa] [--steps 500]
    python -m experiments.gpu.retrieval_probe --tiny            # CPU smoke test (seconds, fp32)
    python -m experiments.gpu.retrieval_probe --plot-only       # redraw from $OUT/retrieval_*.csv

Example (bytes; nothing downloaded): filler of random lowercase letters and spaces; the needle
`#<key>=<value>` (key: --key-len digits, value: --value-len uppercase letters, both random; no
filler byte is one of `#`, `=`, a digit or an uppercase letter) starting at byte floor(depth x
length); the same `#<key>=<value>` as the last bytes of the example (the query, then the answer).
Loss and metric are on the value bytes of the query only, teacher-forced: each is predicted from the
bytes before it (greedy argmax); an example counts as correct when all its value bytes are
(exact match; chance is 26^-value_len). token_acc is the fraction of value bytes right. With one
needle per example the key needs no matching against others: the answer is what followed the only
earlier `#<key>=` (a copy across up to 16K bytes, what induction heads do).

Training mix (documented because only the evaluation is at --seqlen): every step packs
--batch rows of --seqlen bytes into one varlen sequence (cu_seqlens; positions restart per example)
of examples with a uniform random depth in [0, 1). Rows alternate between short examples (lengths
log-uniform in [--min-len, --short-max], about 47 per 16K row: many supervised value bytes, so the
copy mechanism can form) and long ones (log-uniform in [--short-max, --seqlen], about 3 per row: the
long range, and for NSA the selection branch, are trained too). Same model, precision, optimizer and
schedule as train_small (fp32 masters, AdamW, lr 1e-3 warmup 50 / cosine to 1e-4, clip 1).
Evaluation: before training, every --eval-every steps and at the end, --eval-examples fresh
examples of exactly --seqlen bytes per depth in --depths, and as many (at least) of --check-len bytes
(default 1024, inside the training range: tells "never learned the task" from "fails at 16K"); the
same examples for every backend and every evaluation (generators seeded apart from the training
stream). Train accuracy is mostly that of short examples (about 94% of them are under 1K).
Writes $OUT/retrieval_<backend>.csv (train rows: loss and accuracies over the last --log-every
steps, train_s the time spent in training steps so far; eval rows: one per (context, depth);
seconds: the run's time with evaluations; GPU, torch, Triton, commit and the sizes on every row),
$OUT/retrieval.png (held-out accuracy vs step, and at the end vs depth, per backend) and prints a
summary table.
Each backend is one run: they can go in separate calls (same seed, same data). The defaults are
sized for about 4-5 minutes for the three backends on one H100 / H200 (an estimate from
train_small's step times at the same 32K tokens per step, plus six evaluations of 4 x 48
examples at 16K and 4 x 64 at 1K).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.gpu.provenance import out_dir, print_table, require_cuda, run_meta, write_rows
from experiments.gpu.train_small import FULL, TINY, adamw_step, build, cpu_meta, fp32_adamw, lr_at
from nsa_baseline.checks import fail

FILLER = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz "))
KEYS = torch.tensor(list(b"0123456789"))
VALUES = torch.tensor(list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
MARK, SEP = ord("#"), ord("=")
DEFAULTS = dict(seqlen=16384, batch=2, steps=500, min_len=64, short_max=1024, eval_examples=48, log_every=10)
# CPU smoke test: the interpreter and the torch reference are slow, so everything is small.
TINY_DEFAULTS = dict(seqlen=256, batch=2, steps=3, min_len=32, short_max=64, eval_examples=2, log_every=1)
START = time.time()


@dataclass
class Packed:
    """Examples packed into one varlen sequence."""
    ids: torch.Tensor         # int64 [N]
    cu_seqlens: torch.Tensor  # int32 [examples + 1]
    targets: torch.Tensor     # bool [N]: the query's value bytes (loss and metric)
    needles: torch.Tensor     # int64 [examples]: where each needle starts, inside its example


def needle_len(key_len: int, value_len: int) -> int:
    return key_len + value_len + 2  # '#', key, '=', value


def example(length: int, depth: float, gen: torch.Generator, key_len: int = 4, value_len: int = 4):
    """(int64 [length] bytes, needle start): filler, the needle at floor(depth * length) (at most
    where it still ends before the query), the query and its answer as the last bytes."""
    n = needle_len(key_len, value_len)
    if length < 2 * n:
        fail("length", f"must be >= {2 * n} (needle and query), got {length}")
    ids = FILLER[torch.randint(len(FILLER), (length,), generator=gen)]
    key = KEYS[torch.randint(len(KEYS), (key_len,), generator=gen)]
    value = VALUES[torch.randint(len(VALUES), (value_len,), generator=gen)]
    needle = torch.cat([torch.tensor([MARK]), key, torch.tensor([SEP]), value])
    start = min(int(depth * length), length - 2 * n)
    ids[start:start + n] = needle
    ids[length - n:] = needle
    return ids, start


def pack(lengths: list[int], depths: list[float], gen: torch.Generator, key_len: int = 4,
         value_len: int = 4) -> Packed:
    """One example per (length, depth), concatenated."""
    pairs = [example(n, d, gen, key_len, value_len) for n, d in zip(lengths, depths)]
    ids = torch.cat([p[0] for p in pairs])
    ends = torch.tensor(lengths).cumsum(0)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), ends]).to(torch.int32)
    targets = torch.zeros(ids.numel(), dtype=torch.bool)
    for end in ends.tolist():
        targets[end - value_len:end] = True
    return Packed(ids, cu, targets, torch.tensor([p[1] for p in pairs]))


def fill_lengths(total: int, lo: int, hi: int, gen: torch.Generator) -> list[int]:
    """Log-uniform lengths in [lo, hi] summing to exactly `total` (the last one takes a remainder
    shorter than lo, so it may reach hi + lo - 1, never more than total)."""
    lengths, left = [], total
    while left > 0:
        u = torch.rand((), generator=gen).item()
        n = min(left, round(lo * (hi / lo) ** u))
        if left - n < lo:
            n = left
        lengths.append(n)
        left -= n
    return lengths


def train_batch(row: int, args, gen: torch.Generator) -> Packed:
    """--batch rows of --seqlen bytes; row numbers (counted over the run) alternate short / long."""
    lengths = []
    for r in range(row, row + args.batch):
        lo, hi = (args.min_len, args.short_max) if r % 2 == 0 else (args.short_max, args.seqlen)
        lengths += fill_lengths(args.seqlen, lo, hi, gen)
    depths = torch.rand(len(lengths), generator=gen).tolist()
    return pack(lengths, depths, gen, args.key_len, args.value_len)


def value_logits(model, batch: Packed, device) -> torch.Tensor:
    """float32 [targets, 256]: the logits that predict each target byte (from the byte before it);
    the LM head runs on those positions only."""
    out = model.model(input_ids=batch.ids[None].to(device), cu_seq_lens_q=batch.cu_seqlens.to(device))
    before = batch.targets.nonzero().squeeze(1) - 1
    return model.lm_head(out.last_hidden_state[0, before.to(device)]).float()


def score(logits: torch.Tensor, batch: Packed, value_len: int):
    """(mean cross-entropy, exact-match count, correct-byte count) over the batch's value bytes."""
    answer = batch.ids[batch.targets].to(logits.device)
    loss = F.cross_entropy(logits, answer)
    right = (logits.argmax(-1) == answer).view(-1, value_len)
    return loss, int(right.all(1).sum()), int(right.sum())


@torch.no_grad()
def evaluate(model, args, device) -> list[dict]:
    """One row per (context, depth): loss and accuracy over at least --eval-examples fresh examples
    of that length, packed --batch x --seqlen bytes per forward (the training shape)."""
    rows = []
    for context in args.eval_contexts:
        per_pack = args.batch * args.seqlen // context
        packs = -(-args.eval_examples // per_pack)
        for i, depth in enumerate(args.depths):
            # one generator per (context, depth), apart from the training stream: the same examples every time
            gen = torch.Generator().manual_seed(args.seed + 1_000_003 + 1_009 * context + i)
            loss = exact = right = 0.0
            for _ in range(packs):
                batch = pack([context] * per_pack, [depth] * per_pack, gen, args.key_len, args.value_len)
                l, e, r = score(value_logits(model, batch, device), batch, args.value_len)
                loss, exact, right = loss + l.item(), exact + e, right + r
            n = packs * per_pack
            rows.append(dict(context=context, depth=depth, examples=n, loss=f"{loss / packs:.4f}",
                             acc=f"{exact / n:.4f}", token_acc=f"{right / (n * args.value_len):.4f}"))
    return rows


def train(backend: str, args, size: dict, device, dtype, meta: dict) -> list[dict]:
    model = build(size, backend, args.seed, device, dtype)
    master, opt = fp32_adamw(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    rows, t0 = [], time.time()

    def log(row):
        row = dict(backend=backend, **row, seconds=f"{time.time() - t0:.1f}")
        rows.append(row)
        print(f"  [{time.time() - START:6.0f} s] " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    def run_eval(step):
        model.eval()
        for r in evaluate(model, args, device):
            log(dict(phase="eval", step=step, **r, lr="", train_s=""))
        model.train()

    run_eval(0)
    loss_sum = exact = right = examples = n_logged = train_s = 0
    for step in range(args.steps):
        t = time.time()
        batch = train_batch(step * args.batch, args, gen)
        loss, e, r = score(value_logits(model, batch, device), batch, args.value_len)
        loss.backward()
        adamw_step(model, master, opt, lr_at(step, args.steps, args.lr))
        loss_sum, exact, right, n_logged = loss_sum + loss.item(), exact + e, right + r, n_logged + 1
        examples += len(batch.needles)
        train_s += time.time() - t  # loss.item() waited for the step
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            log(dict(phase="train", step=done, context="mixed", depth="mixed", examples=examples,
                     loss=f"{loss_sum / n_logged:.4f}", acc=f"{exact / examples:.4f}",
                     token_acc=f"{right / (examples * args.value_len):.4f}",
                     lr=f"{lr_at(step, args.steps, args.lr):.2e}", train_s=f"{train_s:.4f}"))
            loss_sum = exact = right = examples = n_logged = 0
        if done % args.eval_every == 0 or done == args.steps:
            run_eval(done)
    meta = dict(meta, seed=args.seed, dtype=str(dtype).split(".")[-1], steps=args.steps, seqlen=args.seqlen,
                batch=args.batch, min_len=args.min_len, short_max=args.short_max, key_len=args.key_len,
                value_len=args.value_len,
                **{k: v for k, v in size.items() if k not in ("nsa", "context", "batch")}, **size["nsa"])
    write_rows(args.out / f"retrieval_{backend}.csv", rows, meta)
    return rows


def read_csvs(out: Path) -> dict[str, list[dict]]:
    runs = {}
    for f in sorted(out.glob("retrieval_*.csv")):
        with open(f) as fh:
            rows = list(csv.DictReader(fh))
        if rows:
            runs[rows[0]["backend"]] = rows
    return runs


def _mean_by_step(ev: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps = sorted({int(r["step"]) for r in ev})
    vals = [[float(r[key]) for r in ev if int(r["step"]) == s] for s in steps]
    return steps, [sum(v) / len(v) for v in vals]


def plot(out: Path) -> Path | None:
    """retrieval.png: held-out accuracy (mean over depths) vs step, and at the last step vs needle
    depth, at --seqlen, one colour per backend (solid exact match, dashed per value byte); the left
    panel also has the exact match at the shorter check context (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = read_csvs(out)
    if not runs:
        return None
    meta = next(iter(runs.values()))[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.8))
    handles, checks = [], set()
    for name, rows in runs.items():
        ev = [r for r in rows if r["phase"] == "eval" and r["context"] == r["seqlen"]]
        last = max(int(r["step"]) for r in ev)
        final = sorted((float(r["depth"]), r) for r in ev if int(r["step"]) == last)
        color = None  # the next of the cycle, then kept for the backend's other lines
        for key, style in (("acc", "o-"), ("token_acc", "s--")):
            line, = left.plot(*_mean_by_step(ev, key), style, ms=3, color=color)
            color = line.get_color()
            right.plot([100 * d for d, _ in final], [float(r[key]) for _, r in final], style, ms=4, color=color)
        short = [r for r in rows if r["phase"] == "eval" and r["context"] != r["seqlen"]]
        if short:
            left.plot(*_mean_by_step(short, "acc"), "x:", ms=4, color=color)
            checks.add(short[0]["context"])
        handles.append(Line2D([], [], color=color, label=name))
    for ax in (left, right):
        ax.axhline(1 / len(VALUES), color="gray", lw=0.8, ls="-.")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    left.set_xlabel("training step")
    left.set_ylabel("held-out accuracy (mean over needle depths)")
    right.set_xlabel("needle depth (% of the context)")
    right.set_ylabel(f"held-out accuracy at {meta['seqlen']} bytes after {meta['steps']} steps")
    right.set_xticks(sorted({100 * d for d, _ in final}))
    fig.suptitle(f"Needle retrieval at {meta['seqlen']} bytes ({final[0][1]['examples']} fresh examples per depth): "
                 f"{meta['layers']}-layer Llama, {meta['steps']} training steps\n"
                 f"{meta['dtype']} on {meta['gpu']}, commit {meta['git_commit']}", fontsize=9)
    styles = [Line2D([], [], color="k", marker="o", ms=3, label=f"exact match (all {meta['value_len']} value bytes)"),
              Line2D([], [], color="k", ls="--", marker="s", ms=3, label="per value byte")]
    styles += [Line2D([], [], color="k", ls=":", marker="x", ms=4, label=f"exact match at {c} bytes")
               for c in sorted(checks, key=int)]
    styles.append(Line2D([], [], color="gray", ls="-.", label=f"per-byte chance (1/{len(VALUES)})"))
    # below the axes, on no data: the backends on the left, the line styles on the right
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.06, 0), ncol=len(handles), fontsize=8,
               title="attention", title_fontsize=8)
    fig.legend(handles=styles, loc="lower right", bbox_to_anchor=(0.98, 0), ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path = out / "retrieval.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def summary(out: Path) -> list[dict]:
    """Per backend, context and depth: the last evaluation, the time in training steps and the run's time."""
    table = []
    for name, rows in read_csvs(out).items():
        last = max(int(r["step"]) for r in rows)
        train_s = [r["train_s"] for r in rows if r["phase"] == "train"][-1:] or [""]
        for r in rows:
            if r["phase"] == "eval" and int(r["step"]) == last:
                table.append(dict(backend=name, step=last, context=r["context"], depth=r["depth"],
                                  examples=r["examples"], loss=r["loss"], acc=r["acc"], token_acc=r["token_acc"],
                                  train_s=train_s[0], run_s=rows[-1]["seconds"]))
    return table


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default=None, help="dense, nsa, fsa, auto, torch (default dense,nsa,fsa; "
                                                    "--tiny: dense,torch)")
    ap.add_argument("--steps", type=int, default=None, help=f"default {DEFAULTS['steps']}")
    ap.add_argument("--seqlen", type=int, default=None, help="evaluation context, bytes (default 16384)")
    ap.add_argument("--batch", type=int, default=None, help="rows of --seqlen bytes per step (default 2)")
    ap.add_argument("--min-len", type=int, default=None, help="shortest training example (default 64)")
    ap.add_argument("--short-max", type=int, default=None, help="short / long training example split (default 1024)")
    ap.add_argument("--depths", default="0.05,0.25,0.5,0.9", help="needle depths evaluated (fractions)")
    ap.add_argument("--eval-examples", type=int, default=None, help="per depth (default 48)")
    ap.add_argument("--check-len", type=int, default=None,
                    help="a second, shorter evaluation context inside the training range, to tell 'never learned "
                         "the task' from 'fails at --seqlen' (default --short-max if it divides batch x seqlen; "
                         "0: none); must divide batch x seqlen")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=None, help="train rows average this many steps (default 10)")
    ap.add_argument("--key-len", type=int, default=4)
    ap.add_argument("--value-len", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default $OUT, else ./out)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model and context, fp32, a few steps")
    ap.add_argument("--plot-only", action="store_true", help="redraw retrieval.png from the CSVs in the output folder")
    args = ap.parse_args(argv)
    for k, v in (TINY_DEFAULTS if args.tiny else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.depths = [float(d) for d in args.depths.split(",")]
    check = args.check_len
    if check is None:  # --short-max where it packs evenly, else no check context
        check = 0 if (args.batch * args.seqlen) % args.short_max or args.short_max >= args.seqlen else args.short_max
    if check and (check >= args.seqlen or (args.batch * args.seqlen) % check):
        ap.error(f"--check-len must be shorter than --seqlen and divide batch x seqlen = {args.batch * args.seqlen}, "
                 f"got {check}")
    args.eval_contexts = [args.seqlen] + ([check] if check else [])
    args.backends = args.backends or ("dense,torch" if args.tiny else "dense,nsa,fsa")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    args.out = args.out or out_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        print(f"wrote {plot(args.out)}")
        return 0
    if args.tiny:
        size, device, dtype, meta = TINY, "cpu", torch.float32, cpu_meta()
    else:
        require_cuda()
        size, device, dtype, meta = FULL, "cuda", torch.bfloat16, run_meta()
    size = dict(size, context=args.seqlen)  # max_position_embeddings
    print(f"retrieval_probe: {args.backends} x {args.steps} steps of {args.batch} x {args.seqlen} bytes, {dtype}, "
          f"on {meta['gpu']}, commit {meta['git_commit']}", flush=True)
    finite = True
    for backend in args.backends.split(","):
        rows = train(backend, args, size, device, dtype, meta)
        finite &= all(math.isfinite(float(r["loss"])) for r in rows)
    path = plot(args.out)
    print_table(summary(args.out))
    print(f"wrote {args.out}/retrieval_*.csv and {path} in {time.time() - START:.0f} s")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
