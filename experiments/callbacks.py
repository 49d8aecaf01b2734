"""Hydra callback of the sweep: before the first job, compose and validate every swept value (a
bad value stops the sweep before anything runs) and start the progress bar; after the last job,
merge the rows and write the plots and summary.md of each sweep folder."""
from __future__ import annotations

from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments import folders, progress, report, store
from experiments.runner import CPU_MESSAGE, measuring
from experiments.schema import ConfigError, SweepConfig, validate


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The override list of every job, in launch order, as the basic sweeper builds them
    (hydra.sweeper.params first, command-line overrides win)."""
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create()
    return basic_sweeper_jobs(parser.parse_overrides(params + list(config.hydra.overrides.task)))


def launcher_target(config: DictConfig) -> str:
    """The launcher's class path (hydra.launcher._target_), the basic one when none is set."""
    return str(config.hydra.get("launcher", {}).get("_target_", "BasicLauncher"))


def basic_sweeper_jobs(overrides: list[Override]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches for `overrides`, in its order.

    The one use of Hydra's private API, on purpose: Hydra 1.3 has no public call that lists a
    multirun's jobs before they launch (a callback gets the config only; Sweeper.sweep launches as
    it expands). Expanding the overrides ourselves with the public Override API would be a second
    copy of the sweeper's rules (which sweeps it accepts, key order, later keys winning) that could
    drift from what actually runs; if Hydra moves this function, the sweep tests fail here."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def probe_overrides(jobs: list[list[str]]) -> list[list[str]]:
    """The first job, and for every swept value one job that differs from it in that value only:
    every value gets checked with len(values) compositions instead of one per combination (Hydra
    composes each job before launching anyway, and each job validates its own combination)."""
    first = jobs[0]
    probes = {tuple(first)}
    for i in range(len(first)):
        for value in {job[i] for job in jobs}:
            probes.add(tuple(first[:i] + [value] + first[i + 1:]))
    return [list(p) for p in sorted(probes)]


def check_configs(config: DictConfig, jobs: list[list[str]]) -> list[SweepConfig]:
    loader = GlobalHydra.instance().config_loader()
    return [validate(loader.load_sweep_config(config, probe)) for probe in probe_overrides(jobs)]


def sweep_folders(config: DictConfig, jobs: list[list[str]]) -> set:
    """(results_dir, folder name, predicted?) of every job (experiments/folders.py); the grid axes never
    change a folder, so one composition per distinct set of the other overrides."""
    loader = GlobalHydra.instance().config_loader()
    out, seen = set(), set()
    for job in jobs:
        rest = tuple(o for o in job if folders.override_key(o).split(".")[0] not in folders.GRID_KEYS)
        if rest in seen:
            continue
        seen.add(rest)
        composed = loader.load_sweep_config(config, list(rest))
        cfg = validate(loader.load_sweep_config(config, job))
        out.add((cfg.results_dir, folders.configured_name(composed, composed.hydra, not measuring(cfg)),
                 not measuring(cfg)))
    return out


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.folders: set = set()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = job_overrides(config)
        try:
            checked = check_configs(config, jobs)
        except ConfigError as exc:  # Hydra turns callback exceptions into warnings; SystemExit stops it
            raise SystemExit(f"Bad sweep config, nothing was run: {exc}") from None
        self.folders = sweep_folders(config, jobs)
        if not any(measuring(c) for c in checked):
            fit = checked[0].hardware.calibration
            how = (f"roofline calibrated on measured kernels ({fit})" if fit
                   else "plain roofline, no calibration for this hardware")
            print(f"{CPU_MESSAGE}: {how}, labelled 'predicted'", flush=True)
        progress.start(len(jobs), launcher_target(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        progress.close()
        report.main([str(store.sweep_dir(*folder)) for folder in sorted(self.folders)])
        counts = progress.take_counts()
        if counts["done"] or counts["skipped"]:  # jobs of this process (other launchers print per job)
            predicted = all(folder[2] for folder in self.folders)
            print(f"sweep: {progress.counts_line(predicted, counts)}", flush=True)


class E2ECallback(Callback):
    """The same for `python -m experiments.e2e`: check every job's config, refuse to start without CUDA
    (unless plot_only), and write results.csv, speedups.csv and speedup.png at the end."""

    def __init__(self) -> None:
        self.folders: set = set()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import torch

        from experiments.e2e import CPU_MESSAGE
        from experiments.schema import validate_e2e

        loader = GlobalHydra.instance().config_loader()
        try:
            checked = [validate_e2e(loader.load_sweep_config(config, p)) for p in probe_overrides(job_overrides(config))]
        except ConfigError as exc:
            raise SystemExit(f"Bad e2e config, nothing was run: {exc}") from None
        if not all(c.plot_only for c in checked) and not torch.cuda.is_available():
            raise SystemExit(CPU_MESSAGE)
        self.folders = {store.sweep_dir(c.results_dir, c.name) for c in checked}
        progress.start(len(job_overrides(config)), launcher_target(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from experiments import e2e_report
        from experiments.e2e import UNIT

        progress.close()
        for folder in sorted(self.folders):
            if folder.exists():
                e2e_report.main(folder)
        counts = progress.take_counts()
        if counts["done"] or counts["skipped"]:
            print(f"e2e: {progress.counts_line(False, counts, UNIT)}", flush=True)
