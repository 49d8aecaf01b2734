"""Which folder a sweep writes: the folder follows the configuration, so that sweeps of different
configurations never share a folder (nor its plots).

    results/<name>[_<key>-<value> ...][_predicted]/

<name> is the preset's (sweep, paper=fig4 -> fig4, model=qwen3_14b -> model_qwen3_14b), and every
setting that differs from what the preset composes to adds `_<key>-<value>`, e.g. `scope=module
q_heads=40 gqa=5` -> results/sweep_scope-module_q_heads-40/. Not in the name: the grid axes the plots
draw (gqa, seqlen, sparsity: lines, x-axis and panels), what a sweep runs and how (kernels, pass,
measure, retry_failed, redo_before, breakdown, timing, seed, results_dir), and the hardware peaks of
measured folders (only predictions use them). A `name=` given on the command line is used as given.
Defaults (and presets alone) keep the folder names the README, paper and calibration read.
"""
from __future__ import annotations

import functools
import re

from omegaconf import DictConfig, OmegaConf

PRESET_GROUPS = ("sweep", "paper", "model")  # config groups that define a sweep (and its name)
GRID_KEYS = ("gqa", "seqlen", "sparsity")  # plot coordinates: rows of different values never collide
DECODE_GRID_KEYS = GRID_KEYS + ("batch",)  # scope=decode / generate: the batch is a grid axis too
NOT_CONFIG = ("name", "results_dir", "kernels", "pass", "passes", "measure", "retry_failed", "redo_before",
              "breakdown", "seed", "timing")


def _flat(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_of(cfg) -> dict:
    """A composed sweep config (DictConfig or plain dict, hydra node ignored) as {dotted key: value}."""
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    plain.pop("hydra", None)
    return _flat(plain)


def _text(value) -> str:
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", str(value)).strip("_") or "none"


def folder_name(settings: dict, base: dict, predicted: bool) -> str:
    """<name>_<key>-<value>... for every setting of `settings` that differs from `base` (the preset's
    composition) and is part of the configuration (not a grid axis, not a run option)."""
    parts = [str(settings["name"])]
    grid = DECODE_GRID_KEYS if settings.get("scope") in ("decode", "generate") else GRID_KEYS
    for key, value in settings.items():
        top = key.split(".")[0]
        if top in grid or top in NOT_CONFIG or base.get(key) == value:
            continue
        if key == "kv_heads" and settings.get("q_heads") is not None:
            continue  # derived: kv_heads = q_heads / gqa
        if top == "hardware":
            continue
        parts.append(f"{key}-{_text(value)}")
    hardware = {k: v for k, v in settings.items() if k.startswith("hardware.")}
    if predicted and any(base.get(k) != v for k, v in hardware.items()):
        parts.append(f"hardware-{_text(settings.get('hardware.name'))}")
    return "_".join(parts)


def override_key(override: str) -> str:
    """`key` of a Hydra override `key=value` (also `+key=`, `~key`)."""
    return override.split("=", 1)[0].lstrip("+~")


@functools.lru_cache(maxsize=32)
def _base_settings(config_name: str, overrides: tuple) -> dict:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    loader = GlobalHydra.instance().config_loader()
    return settings_of(loader.load_configuration(config_name=config_name, overrides=list(overrides),
                                                 run_mode=RunMode.RUN))


def configured_name(cfg, hydra_node, predicted: bool) -> str:
    """The folder name of a composed job config `cfg` whose Hydra node (HydraConfig.get() in a job, or
    `composed.hydra`) holds the overrides it was composed with."""
    task = list(hydra_node.overrides.task)
    settings = settings_of(cfg)
    if any(override_key(o) == "name" for o in task):
        return str(settings["name"])
    presets = tuple(list(hydra_node.overrides.hydra) + [o for o in task if override_key(o) in PRESET_GROUPS])
    return folder_name(settings, _base_settings(hydra_node.job.config_name, presets), predicted)
