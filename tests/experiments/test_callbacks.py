"""experiments.callbacks: the job list the sweep validates before anything runs is the basic sweeper's."""
from hydra.core.override_parser.overrides_parser import OverridesParser

from experiments.callbacks import basic_sweeper_jobs, probe_overrides


def test_basic_sweeper_jobs_is_the_product_in_launch_order_and_later_keys_win():
    overrides = OverridesParser.create().parse_overrides(["gqa=1,2", "seqlen=8,16", "dtype=float32", "gqa=4,8"])
    jobs = basic_sweeper_jobs(overrides)
    assert jobs == [["gqa=4", "seqlen=8", "dtype=float32"], ["gqa=4", "seqlen=16", "dtype=float32"],
                    ["gqa=8", "seqlen=8", "dtype=float32"], ["gqa=8", "seqlen=16", "dtype=float32"]]
    assert len(probe_overrides(jobs)) == 3  # the first job, and one per other swept value
