"""Calibrated predictions: the cost model's roofline, scaled to what each kernel really achieves.

The roofline counts every byte from HBM at peak bandwidth. Real kernels differ from it in ways the
counts cannot see, and by kernel: NSA rereads blocks its neighbours just loaded, from L2 (measured
~0.4x its roofline on the H100), FSA gathers queries and pays ~0.2-0.5 ms of host launches per call,
FlashAttention runs below peak. Without a GPU the sweep predicts

    ms = a * roofline_ms + b

with (a, b) per (scope, kernel, pass, block size) fitted to measured rows of one GPU (least squares
on relative error; b >= 0 is a fixed cost such as launches). The fit lives in a CSV with its
provenance (GPU, commits, points) and is made by

    python -m experiments.calibration [results/sweep results/fig4 ...] [--out results/calibration/h100.csv]

from the measured sweep folders. A key with no fitted points falls back to the same kernel and pass
at any block size, then to the plain roofline (a=1, b=0), and the row's message says which. Only
the fwd and bwd lines predict: a fwd+bwd prediction is their sum, and the module's branches share
its prediction in proportion to their rooflines, so predictions add up wherever they are compared.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from experiments import cost_model as cm
from experiments import costs, store
from experiments.calibration_plot import plot_calibration
from experiments.points import Point
from experiments.schema import HardwareConfig, SelectionConfig

REPO = Path(__file__).resolve().parents[1]
KEYS = ["scope", "kernel", "pass", "block_size"]
SOURCES = ("results/sweep", "results/fig4", "results/fig7_8")
STAND_IN = {"fla": "nsa"}  # fla's kernel is query-outer like ours: NSA's fit when it has none
CALIBRATED = " x roofline"  # in the message of every calibrated prediction ("1.23 x roofline + 0.1 ms")
MIN_POINTS_FOR_OFFSET = 4  # fewer points (or a negative offset): a alone, b = 0


def resolve(path: str) -> Path:
    """A calibration path as given, or relative to the repository when it is not absolute."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


def roofline_ms(kernel: str, point: Point, stats: cm.SelectionStats, pass_name: str, sel: SelectionConfig,
                hw: HardwareConfig) -> float:
    cost = costs.kernel_cost(kernel, point, stats, sel, hw).for_pass(pass_name)
    return cm.roofline_ms(cost, hw.peak_tflops, hw.peak_gbps)


def point_stats(point: Point, sel: SelectionConfig) -> cm.SelectionStats:
    """The closed-form counts predicted rows use (uniformly random causal indices)."""
    return cm.stats_uniform_random(point.seqlen, point.kv_heads, point.block_size, point.topk, point.batch,
                                   sel.init_blocks, sel.local_blocks)


def point_of(row: pd.Series) -> Point:
    return Point(row["scope"], int(row["gqa"]), int(row["kv_heads"]), int(row["head_dim"]), int(row["seqlen"]),
                 int(row["batch"]), int(row["block_size"]), int(row["topk"]), row["dtype"], row["indices"])


def fit_line(roofline: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising sum((a * x + b) / y - 1)^2, b >= 0; a median ratio when b cannot be fitted."""
    ratio_only = (float(np.median(measured / roofline)), 0.0)
    if len(roofline) < MIN_POINTS_FOR_OFFSET or len(np.unique(roofline.round(6))) < 2:
        return ratio_only
    design = np.stack([roofline, np.ones_like(roofline)], 1) / measured[:, None]
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(measured), rcond=None)
    return (float(a), float(b)) if a > 0 and b >= 0 else ratio_only


def with_roofline(rows: pd.DataFrame, hw: HardwareConfig, sel: SelectionConfig) -> pd.DataFrame:
    """rows with a roofline_ms column: the plain roofline of each row's kernel, pass and point."""
    points = [point_of(r) for _, r in rows.iterrows()]
    return rows.assign(roofline_ms=[roofline_ms(k, pt, point_stats(pt, sel), p, sel, hw)
                                    for k, p, pt in zip(rows["kernel"], rows["pass"], points)])


def calibration_rows(measured: pd.DataFrame, hw: HardwareConfig, sel: Optional[SelectionConfig] = None) -> pd.DataFrame:
    """The measured ok rows a fit uses (selected / module scopes; auto is predicted as the faster
    family, not fitted), with their roofline_ms."""
    rows = measured[(measured["status"] == "ok") & measured["scope"].isin(["selected", "module"])
                    & (measured["kernel"] != "auto")].copy()
    if rows.empty:
        raise ValueError("no measured ok rows of scope selected/module to calibrate on")
    return with_roofline(rows, hw, sel or SelectionConfig())


def fit_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per KEYS of calibration_rows: a, b, points, the spread of measured / predicted after
    the fit, GPU and commits."""
    out = []
    for key, grp in rows.groupby(KEYS):
        x, y = grp["roofline_ms"].to_numpy(float), grp["median_ms"].to_numpy(float)
        a, b = fit_line(x, y)
        err = (a * x + b) / y
        out.append(dict(zip(KEYS, key), a=round(a, 4), b_ms=round(b, 4), points=len(grp),
                        min_pred_over_meas=round(err.min(), 3), max_pred_over_meas=round(err.max(), 3),
                        gpu=", ".join(sorted(set(grp["gpu"].astype(str)))),
                        commits=" ".join(sorted(set(grp["git_commit"].astype(str)))),
                        seqlens=f"{int(grp['seqlen'].min())}-{int(grp['seqlen'].max())}",
                        gqa=" ".join(map(str, sorted(set(grp["gqa"].astype(int)))))))
    return pd.DataFrame(out)


def fit(measured: pd.DataFrame, hw: HardwareConfig, sel: Optional[SelectionConfig] = None) -> pd.DataFrame:
    """The fit table of a sweep's measured rows (fit_table of calibration_rows)."""
    return fit_table(calibration_rows(measured, hw, sel))


@dataclass
class Calibration:
    table: pd.DataFrame
    source: str

    @classmethod
    def load(cls, path: Optional[str]) -> Optional["Calibration"]:
        if not path:
            return None
        p = resolve(path)
        if not p.exists():
            raise FileNotFoundError(f"hardware.calibration={path!r}: no such file (looked at {p})")
        return cls(pd.read_csv(p, dtype={"commits": str, "gpu": str}), str(path))

    def line(self, scope: str, kernel: str, pass_name: str, block_size: int) -> tuple[float, float, str]:
        """(a, b, what was used) for a key, with the fallbacks of the module docstring."""
        scope = scope.split("/")[0]
        t = self.table
        for k in (kernel, STAND_IN.get(kernel)):
            if k is None:
                continue
            same = t[(t["scope"] == scope) & (t["kernel"] == k) & (t["pass"] == pass_name)]
            exact = same[same["block_size"] == block_size]
            if len(exact):
                r = exact.iloc[0]
                return float(r["a"]), float(r["b_ms"]), f"{k} fit ({r['gpu']}, {int(r['points'])} points)"
            if len(same):
                return (float(same["a"].median()), float(same["b_ms"].median()),
                        f"{k} fit at other block sizes ({same['gpu'].iloc[0]})")
        return 1.0, 0.0, "no fit: plain roofline"


def auto_family(point: Point, stats: cm.SelectionStats, pass_name: str, sel: SelectionConfig, hw: HardwareConfig,
                calib: Optional[Calibration]) -> str:
    """The family auto runs: the faster at what fsa.auto times, the forward alone without gradients
    (pass fwd), forward + backward with them (bwd and fwd+bwd run the family of one choice)."""
    timed = "fwd" if pass_name == "fwd" else "fwd+bwd"
    return min(("nsa", "fsa"), key=lambda k: predicted_ms(k, point, stats, timed, sel, hw, calib)[0])


def predicted_ms(kernel: str, point: Point, stats: cm.SelectionStats, pass_name: str, sel: SelectionConfig,
                 hw: HardwareConfig, calib: Optional[Calibration]) -> tuple[float, str]:
    """(ms, how): the roofline, calibrated when `calib` is given. A fwd+bwd call is a forward then a
    backward, so its prediction is the sum of theirs (fwd + bwd == fwd+bwd for every kernel; the
    fwd+bwd lines of a fit are not used). auto = the family of `auto_family`."""
    if kernel == "auto":
        family = auto_family(point, stats, pass_name, sel, hw, calib)
        ms, how = predicted_ms(family, point, stats, pass_name, sel, hw, calib)
        return ms, f"auto -> {family}: {how}"
    if pass_name == "fwd+bwd":
        (fwd, fwd_how), (bwd, bwd_how) = (predicted_ms(kernel, point, stats, p, sel, hw, calib) for p in ("fwd", "bwd"))
        return fwd + bwd, f"fwd {fwd:.3g} ms ({fwd_how}) + bwd {bwd:.3g} ms ({bwd_how})"
    raw = roofline_ms(kernel, point, stats, pass_name, sel, hw)
    if calib is None:
        return raw, "plain roofline"
    a, b, how = calib.line(point.scope, kernel, pass_name, point.block_size)
    return a * raw + b, f"{a:.3g}{CALIBRATED} + {b:.3g} ms, {how}"


def predicted_branch_ms(kernel: str, point: Point, stats: cm.SelectionStats, pass_name: str, sel: SelectionConfig,
                        hw: HardwareConfig, calib: Optional[Calibration]) -> dict[str, float]:
    """The module's prediction (predicted_ms at scope module) split over its branches (compressed,
    selected, window) in proportion to their plain rooflines, pass by pass: the branches sum to the
    module's predicted time, which is calibrated where a fit exists (branches have no fit of their own)."""
    family = auto_family(point, stats, pass_name, sel, hw, calib) if kernel == "auto" else kernel
    if pass_name == "fwd+bwd":
        fwd, bwd = (predicted_branch_ms(family, point, stats, p, sel, hw, calib) for p in ("fwd", "bwd"))
        return {b: fwd[b] + bwd[b] for b in fwd}
    parts = {"selected": costs.selected_cost(family, point, stats), **costs.branch_costs(point, sel)}
    roof = {b: cm.roofline_ms(c.for_pass(pass_name), hw.peak_tflops, hw.peak_gbps) for b, c in parts.items()}
    total = predicted_ms(family, replace(point, scope="module"), stats, pass_name, sel, hw, calib)[0]
    return {b: total * r / sum(roof.values()) for b, r in roof.items()}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="*", default=list(SOURCES), help="measured sweep folders")
    ap.add_argument("--gpu", default="H100", help="keep rows whose GPU name contains this")
    ap.add_argument("--hardware", default="h100", help="configs/hardware/<name>.yaml: the peaks of the roofline")
    ap.add_argument("--out", default="results/calibration/h100.csv")
    args = ap.parse_args(argv)
    from omegaconf import OmegaConf

    hw_cfg = OmegaConf.load(REPO / "configs" / "hardware" / f"{args.hardware}.yaml")
    hw = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HardwareConfig), hw_cfg))
    frames = [store.read_rows(resolve(f)) for f in args.folders]
    measured = pd.concat([f for f in frames if len(f)], ignore_index=True)
    measured = measured[measured["gpu"].astype(str).str.contains(args.gpu, regex=False)]
    rows = calibration_rows(measured, hw)
    table = fit_table(rows)
    out = resolve(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    ab = table.set_index(KEYS).loc[list(rows.set_index(KEYS).index), ["a", "b_ms"]].to_numpy()
    rows = rows.assign(calibrated_ms=ab[:, 0] * rows["roofline_ms"].to_numpy() + ab[:, 1])
    png = plot_calibration(rows, out.with_suffix(".png"))
    print(f"{out}: {len(table)} fits from {len(measured)} rows of {', '.join(args.folders)}; {png.name}")


if __name__ == "__main__":
    main()
