"""experiments.gpu_lease: concurrent sweep jobs never get the same GPU (CPU-only: file locks)."""
import multiprocessing as mp
import time

import pytest

from experiments.gpu_lease import exclusive_gpu


def _hold(lock_dir, count, first, hold_s, out):
    with exclusive_gpu(count, first=first, lock_dir=lock_dir, poll_s=0.02) as gpu:
        t0 = time.monotonic()
        time.sleep(hold_s)
        out.put((gpu, t0, time.monotonic()))


def test_concurrent_jobs_hold_distinct_gpus_and_extra_jobs_wait(tmp_path):
    """Four jobs on two GPUs, all asking for GPU 0 first: at most two hold GPUs at once, never the
    same one (the old job.num % count mapping would put jobs 0 and 2 on GPU 0 together)."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(tmp_path, 2, 0, 0.4, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    spans = [out.get(timeout=5) for _ in procs]
    assert {g for g, _, _ in spans} == {0, 1}
    for i, (g1, a1, b1) in enumerate(spans):
        for g2, a2, b2 in spans[i + 1:]:
            if g1 == g2:
                assert b1 <= a2 or b2 <= a1, "two jobs held one GPU at the same time"


def test_lease_prefers_its_own_gpu_is_released_and_times_out(tmp_path):
    with exclusive_gpu(3, first=4, lock_dir=tmp_path) as gpu:
        assert gpu == 1  # job 4 of 3 GPUs tries GPU 1 first
    with exclusive_gpu(1, lock_dir=tmp_path) as gpu:
        assert gpu == 0
        ctx = mp.get_context("fork")
        p = ctx.Process(target=_timeout_child, args=(tmp_path,))
        p.start()
        p.join(timeout=30)
        assert p.exitcode == 7, "a second holder of the only GPU must wait and time out"
    with pytest.raises(ValueError, match="count"):
        with exclusive_gpu(0, lock_dir=tmp_path):
            pass


def _timeout_child(lock_dir):
    try:
        with exclusive_gpu(1, lock_dir=lock_dir, poll_s=0.02, timeout_s=0.2):
            raise SystemExit(1)
    except TimeoutError:
        raise SystemExit(7)


def test_sweep_job_runs_on_the_gpu_it_holds(monkeypatch, tmp_path):
    """experiments.sweep.run on a (faked) 2-GPU machine: the job's device is the leased GPU, and the
    lease is held while the job runs."""
    import torch

    from experiments import gpu_lease, sweep
    from experiments.schema import SweepConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devices, held = [], []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(gpu_lease, "default_lock_dir", lambda: tmp_path)

    def job(cfg, on_step=None):
        with pytest.raises(TimeoutError):  # the job's GPU is taken while it runs
            with exclusive_gpu(1, first=0, lock_dir=tmp_path, poll_s=0.01, timeout_s=0.05):
                pass
        held.append(True)

    monkeypatch.setattr(sweep, "run_job", job)
    sweep.run(SweepConfig(), num=2)  # job 2 of 2 GPUs tries GPU 0 first
    assert devices == [0] and held == [True]


def test_progress_bar_only_for_jobs_of_this_process(capsys):
    """The basic launcher runs the jobs here, so the bar can follow them; joblib's or SLURM's jobs run
    in other processes: no bar (it would stay at 0), one line saying each job reports itself."""
    from experiments import progress

    progress.start(3, "hydra._internal.core_plugins.basic_launcher.BasicLauncher")
    assert progress.in_multirun()
    progress.close()
    progress.start(8, "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")
    assert not progress.in_multirun()
    assert "8 jobs through JoblibLauncher" in capsys.readouterr().out
