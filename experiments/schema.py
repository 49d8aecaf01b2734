"""Structured configs of the sweep (registered in Hydra's ConfigStore) and their value checks.

The dataclasses catch typos and type errors when Hydra composes a config; `validate` catches bad
values (unknown kernel, dtype or pass, non-positive sizes, ...) and is run on every job's config
by `callbacks.SweepCallback.on_multirun_start` before the first job starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import pandas as pd
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from nsa_baseline.contract import BLOCK_SIZES

KERNELS = ("nsa", "fsa", "auto", "sdpa", "fla", "flashinfer")
PASSES = ("fwd", "bwd", "fwd+bwd")
# "all": every kernel of the prefill scopes (flashinfer is a scope=decode peer only, named explicitly)
KERNEL_PRESETS = {"all": KERNELS[:-1], "sparse": ("nsa", "fsa", "auto")}
PASS_PRESETS = {"all": PASSES}
DTYPES = ("bfloat16", "float16", "float32")
SCOPES = ("selected", "module", "decode", "generate")
# scope=decode: one decode step over a cache of `seqlen` tokens for `batch` sequences; scope=generate:
# prefill `seqlen` tokens then `decode_steps` steps. Their "passes" say how our steps (and dense's) run.
DECODE_SCOPES = ("decode", "generate")
DECODE_PASSES = ("eager", "graph", "graph16")
# graph16 (scope=decode only): STEPS_PER_GRAPH consecutive steps replayed from one CUDA graph, time per
# step: the cache grows as in real decoding (1 step in kernel_stride completes a summary) and dense
# gets the same amortised launches; graph times one step that completes a summary (the worst case).
GENERATE_PASSES = ("eager", "graph")
INDEX_SOURCES = ("nsa", "random")
MEASURE_MODES = ("auto", "time", "predict")


class ConfigError(ValueError):
    """A config value that cannot be run; the message names the key and the allowed values."""


@dataclass
class SparsityConfig:
    block_size: int = 64  # BS: keys per selected block
    topk: int = 16  # T: selected blocks per query (init and local blocks included)


@dataclass
class SelectionConfig:
    """The NSA selection path and module branches (the NSA paper's defaults, its §4.1, which FSA keeps)."""

    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    window_size: int = 512


@dataclass
class HardwareConfig:
    """Nominal peaks and the calibration of predicted rows (not used when timing)."""

    name: str = "H100 SXM"
    peak_tflops: float = 989.0  # dense bf16 tensor core
    peak_gbps: float = 3350.0
    memory_gb: float = 80.0  # device memory: FSA's default buffer budget in predicted memory
    # CSV of experiments/calibration.py: predicted ms = a * roofline + b per kernel, fitted to this
    # GPU's measurements (None: the plain roofline)
    calibration: Optional[str] = None


@dataclass
class TimingConfig:
    warmup_ms: int = 25  # triton.testing.do_bench warm-up budget
    rep_ms: int = 100  # triton.testing.do_bench measuring budget
    ref_rows: int = 256  # query rows checked against the float32 reference for rel_err


@dataclass
class SweepConfig:
    name: str = "sweep"  # results go to <results_dir>/<name>/
    results_dir: str = "results"
    gqa: int = 4  # G = HQ / H
    kv_heads: int = 4  # H
    q_heads: Optional[int] = None  # HQ; when set, kv_heads = q_heads / gqa (the paper's 64-head runs)
    head_dim: int = 128  # D
    seqlen: int = 65536  # N tokens per sequence
    batch: int = 1  # sequences packed with cu_seqlens
    dtype: str = "bfloat16"
    scope: str = "selected"  # selected attention alone, or the whole NSA module
    indices: str = "nsa"  # nsa: the NSA compression path; random: uniformly random causal
    kernels: Any = "all"  # a kernel, a list of them, or a preset: all | sparse
    passes: Any = "all"  # config key `pass` (a Python keyword is no field name): fwd | bwd | fwd+bwd | list | all
    measure: str = "auto"  # auto: time on CUDA, else predict; time: always time; predict: cost model only
    retry_failed: bool = False  # rerun points recorded as error / oom instead of skipping them
    # ISO date or time (UTC unless it says otherwise): measure again points recorded before it, e.g.
    # after a kernel change; resumable, since rows recorded by the refresh itself are kept
    redo_before: Optional[str] = None
    decode_steps: int = 512  # scope=generate: tokens generated after the prefill
    breakdown: bool = True  # scope=module: also time each branch alone (rows module/<branch>, breakdown.png)
    seed: int = 0
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)


PAPER_FIGURES = ("fig2", "fig3", "fig4", "fig7", "fig8", "table5", "tables67", "tables89", "table10", "nsa_table4",
                 "figs5_6")


@dataclass
class PaperConfig:
    figure: str = "all"  # one of PAPER_FIGURES, or all
    results_dir: str = "results"  # sweep CSVs are read from <results_dir>/*/results.csv
    out_dir: str = "results/paper"


E2E_BACKENDS = ("dense", "nsa", "fsa", "auto")
E2E_STEPS = ("train", "prefill", "generate", "generate_graph")
E2E_PRESETS = {"all": ("dense", "nsa", "fsa")}


@dataclass
class E2EConfig:
    """`python -m experiments.e2e` (configs/e2e/e2e.yaml): L decoder layers of a real model, one step."""

    name: str = "e2e"  # rows go to <results_dir>/<name>/
    results_dir: str = "results"
    model: str = "llama3_8b"  # heads from configs/model/<model>.yaml, sizes from experiments/e2e_timing.SHAPES
    seqlen: int = 65536  # N tokens of the one sequence
    sparsity: str = "bs128_t8"  # (BS, T): a preset of configs/sparsity/
    layers: int = 2  # decoder layers L (as many as fit; per-layer time = step / L)
    backends: Any = "all"  # dense | nsa | fsa | auto, a list, or all (= dense, nsa, fsa)
    # train (fwd + bwd + AdamW) | prefill (forward, no_grad) | generate (prefill + 512 eager decode steps
    # with a KV cache) | generate_graph (the same, each step replayed from a CUDA graph), a list, or all
    steps: Any = "all"
    reps: int = 3  # timed calls per step after one warmup (median); train and prefill
    generate_reps: int = 1  # the same for generate (one call is prefill + 512 eager steps: seconds)
    retry_failed: bool = False  # rerun points recorded as error / oom instead of skipping them
    redo_before: Optional[str] = None  # measure again rows recorded before this ISO time (UTC)
    plot_only: bool = False  # measure nothing: redraw results/<name>/ from its rows (works without CUDA)


def sparsity_preset(name: str) -> SparsityConfig:
    """configs/sparsity/<name>.yaml as a SparsityConfig; ConfigError for an unknown preset."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "sparsity"
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    _one_of("sparsity", name, known)
    preset = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SparsityConfig),
                                                 OmegaConf.load(folder / f"{name}.yaml")))
    _one_of(f"sparsity {name}: block_size", preset.block_size, BLOCK_SIZES)
    return preset


def validate_e2e(cfg: DictConfig | E2EConfig) -> E2EConfig:
    """Return the config as an E2EConfig, or raise ConfigError naming the first bad value."""
    from experiments.e2e_timing import SHAPES

    if isinstance(cfg, DictConfig):
        plain = OmegaConf.to_container(cfg, resolve=False)
        plain.pop("hydra", None)
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(E2EConfig), plain))
    _one_of("model", cfg.model, sorted(SHAPES))
    for key in ("seqlen", "layers", "reps", "generate_reps"):
        _positive(key, getattr(cfg, key))
    sparsity_preset(cfg.sparsity)
    cfg.backends = _names("backends", cfg.backends, E2E_BACKENDS, E2E_PRESETS)
    cfg.steps = _names("steps", cfg.steps, E2E_STEPS, {"all": E2E_STEPS})
    _check_run_options(cfg)
    return cfg


def _check_run_options(cfg) -> None:
    if cfg.redo_before is not None:
        try:
            utc_time(str(cfg.redo_before))
        except ValueError:
            raise ConfigError(f"redo_before={cfg.redo_before!r} must be an ISO date or time, "
                              "e.g. 2026-11-23 or 2026-11-23T17:00") from None
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name={cfg.name!r} must be a non-empty folder name without '/'")


def sweep_schema() -> DictConfig:
    """SweepConfig as Hydra sees it: the key `pass` instead of the field `passes`."""
    node = OmegaConf.structured(SweepConfig)
    with open_dict(node):
        del node["passes"]
        node["pass"] = "all"
    return node


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="sweep_schema", node=sweep_schema())
    cs.store(name="paper_schema", node=PaperConfig)
    cs.store(name="e2e_schema", node=E2EConfig)


def _names(key: str, value, allowed, presets) -> List[str]:
    """A name, a list of names or a preset -> the list of names, each checked."""
    if isinstance(value, str):
        value = list(presets.get(value, [value]))
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}={value!r} must name at least one of {list(allowed)} (or a preset: {list(presets)})")
    for name in value:
        _one_of(key, name, allowed)
    return list(value)


def validate_paper(cfg: DictConfig) -> PaperConfig:
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    paper = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PaperConfig), plain))
    _one_of("figure", paper.figure, PAPER_FIGURES + ("all",))
    return paper


def utc_time(text: str) -> pd.Timestamp:
    """An ISO date or time as a UTC timestamp (naive = UTC); ValueError when it is neither."""
    ts = pd.Timestamp(text)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _positive(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


def validate(cfg: DictConfig | SweepConfig) -> SweepConfig:
    """Return the config as a SweepConfig, or raise ConfigError naming the first bad value."""
    if isinstance(cfg, DictConfig):
        plain = OmegaConf.to_container(cfg, resolve=False)
        plain.pop("hydra", None)
        plain["passes"] = plain.pop("pass", "all")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), plain))
    for key in ("gqa", "kv_heads", "head_dim", "seqlen", "batch"):
        _positive(key, getattr(cfg, key))
    if cfg.q_heads is not None:
        _positive("q_heads", cfg.q_heads)
        if cfg.q_heads % cfg.gqa:
            raise ConfigError(f"q_heads={cfg.q_heads} must be a multiple of gqa={cfg.gqa}")
        cfg.kv_heads = cfg.q_heads // cfg.gqa
    _one_of("dtype", cfg.dtype, DTYPES)
    _one_of("scope", cfg.scope, SCOPES)
    _one_of("indices", cfg.indices, INDEX_SOURCES)
    _one_of("measure", cfg.measure, MEASURE_MODES)
    _one_of("sparsity.block_size", cfg.sparsity.block_size, BLOCK_SIZES)
    _positive("sparsity.topk", cfg.sparsity.topk)
    cfg.kernels = _names("kernels", cfg.kernels, KERNELS, KERNEL_PRESETS)
    if cfg.scope in DECODE_SCOPES:
        allowed = DECODE_PASSES if cfg.scope == "decode" else GENERATE_PASSES
        cfg.passes = _names("pass", cfg.passes, allowed, {"all": allowed})
        _positive("decode_steps", cfg.decode_steps)
    else:
        cfg.passes = _names("pass", cfg.passes, PASSES, PASS_PRESETS)
    for key in ("kernel_size", "kernel_stride", "window_size", "local_blocks"):
        _positive(f"selection.{key}", getattr(cfg.selection, key))
    if cfg.selection.init_blocks < 0:
        raise ConfigError(f"selection.init_blocks={cfg.selection.init_blocks} must be >= 0")
    if cfg.selection.init_blocks + cfg.selection.local_blocks > cfg.sparsity.topk:
        raise ConfigError("selection.init_blocks + selection.local_blocks must not exceed sparsity.topk")
    for key in ("peak_tflops", "peak_gbps"):
        if not getattr(cfg.hardware, key) > 0:
            raise ConfigError(f"hardware.{key} must be positive")
    for key in ("warmup_ms", "rep_ms", "ref_rows"):
        _positive(f"timing.{key}", getattr(cfg.timing, key))
    _check_run_options(cfg)
    return cfg
