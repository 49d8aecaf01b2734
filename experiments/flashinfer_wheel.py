"""A FlashInfer wheel small enough to carry to the GPU machine, for decode_bench's FlashInfer rows.

    python -m experiments.flashinfer_wheel WHEEL [--out .whl]

flashinfer-python is a JIT package: ~57 MiB compressed, mostly CUDA sources of kernels the decode
peer never builds (samplers, MoE, Blackwell GEMMs, ...), and together with the repository and the other
wheels it exceeds the device tool's 64 MiB carry. This copies WHEEL into --out without the source
trees in DROP (under flashinfer/data/), with RECORD rewritten to match; the batch-decode sources and
headers (flashinfer/data/csrc/batch_decode*, flashinfer/data/include) stay. The GPU machine also
needs apache-tvm-ffi (a cp312 wheel); its image has nvcc, nvidia-ml-py, einops and tabulate. Fetch:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 -d /tmp/fi flashinfer-python==0.7.2.post1 "apache-tvm-ffi<0.2"
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

DROP = tuple(f"flashinfer/data/{p}" for p in (
    "csrc/cake_sampling/", "csrc/kda/", "csrc/cake_dsv4/", "csrc/fused_moe/", "csrc/cake_fmha/", "csrc/gdn/",
    "csrc/experimental/", "csrc/blackwell_bf16_fp4/", "csrc/blackwell_msa/", "csrc/alphamoe_",
    "cutlass/examples/", "cutlass/python/"))


def slim(wheel: Path, out_dir: Path) -> Path:
    """Write wheel's copy without DROP's files into out_dir (same name); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel.name
    if target.resolve() == wheel.resolve():
        raise ValueError(f"argument `--out` must not be the wheel's own folder ({wheel.parent})")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if not n.startswith(DROP)]
        kept = set(names)
        for name in names:
            if name.endswith(".dist-info/RECORD"):
                lines = src.read(name).decode().splitlines()
                dst.writestr(name, "\n".join(ln for ln in lines if ln.split(",", 1)[0] in kept) + "\n")
            else:
                dst.writestr(src.getinfo(name), src.read(name))
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--out", type=Path, default=Path(".whl"))
    args = ap.parse_args(argv)
    if not args.wheel.is_file() or args.wheel.suffix != ".whl":
        print(f"argument `wheel` must be a .whl file, got {args.wheel}", file=sys.stderr)
        return 2
    try:
        target = slim(args.wheel, args.out)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"{target}: {target.stat().st_size / 2**20:.1f} MiB (from {args.wheel.stat().st_size / 2**20:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
