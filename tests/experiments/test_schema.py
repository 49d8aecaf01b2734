"""Config parsing and validation: presets compose, every bad value is a clear ConfigError."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from experiments.schema import ConfigError, register_configs, validate

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
register_configs()


def load(*overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="sweep", overrides=list(overrides))


def test_defaults_and_presets():
    cfg = validate(load())
    assert cfg.kernels == ["nsa", "fsa", "auto", "sdpa", "fla"] and cfg.passes == ["fwd", "bwd", "fwd+bwd"]
    assert (cfg.sparsity.block_size, cfg.sparsity.topk) == (64, 16)
    cfg = validate(load("sparsity=bs128_t8", "kernels=sparse", "pass=fwd+bwd", "hardware=h200"))
    assert (cfg.sparsity.block_size, cfg.sparsity.topk, cfg.hardware.peak_gbps) == (128, 8, 4800.0)
    assert cfg.hardware.calibration == "results/calibration/h100.csv"  # H100 fit on H200 peaks
    assert validate(load("hardware=h20")).hardware.calibration is None  # other compute: plain roofline
    assert cfg.kernels == ["nsa", "fsa", "auto"] and cfg.passes == ["fwd+bwd"]
    assert validate(load("kernels=[nsa,sdpa]")).kernels == ["nsa", "sdpa"]


def test_paper_preset_sets_heads_from_q_heads():
    cfg = validate(load("paper=fig4", "gqa=8"))
    assert (cfg.q_heads, cfg.kv_heads, cfg.scope, cfg.passes) == (64, 8, "module", ["fwd+bwd"])


MODELS = {"llama2_7b": (32, 1, 128), "llama3_8b": (32, 4, 128), "llama3_70b": (64, 8, 128),
          "qwen2_5_7b": (28, 7, 128), "qwen2_5_32b": (40, 5, 128), "qwen3_14b": (40, 5, 128)}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_presets_fix_the_heads_and_sweep_n_and_both_presets(model):
    """model=<name>: the model's HQ, G and D (its config.json); KV heads follow as HQ / G."""
    hq, g, d = MODELS[model]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        full = compose(config_name="sweep", overrides=[f"model={model}"], return_hydra_config=True)
    params = full.hydra.sweeper.params
    assert str(params.gqa) == str(g) and params.sparsity == "bs64_t16,bs128_t8" and "65536" in str(params.seqlen)
    cfg = validate(load(f"model={model}", f"gqa={g}"))
    assert (cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.name) == (hq, hq // g, d, f"model_{model}")
    assert cfg.hardware.calibration == "results/calibration/h100.csv"  # the default hardware's fit


@pytest.mark.parametrize("override, message", [
    ("seqlen=-1", "seqlen=-1 must be a positive integer"),
    ("gqa=0", "gqa=0 must be a positive integer"),
    ("dtype=int8", "dtype='int8' is not allowed"),
    ("kernels=bogus", "kernels='bogus' is not allowed"),
    ("kernels=[nsa,flash]", "kernels='flash' is not allowed"),
    ("pass=sideways", "pass='sideways' is not allowed"),
    ("scope=everything", "scope='everything' is not allowed"),
    ("indices=sorted", "indices='sorted' is not allowed"),
    ("sparsity.block_size=48", "sparsity.block_size=48 is not allowed"),
    ("q_heads=6", "q_heads=6 must be a multiple of gqa=4"),
], ids=lambda x: x.split("=")[0] if "=" in x else "")
def test_bad_values_are_rejected_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        validate(load(override))


@pytest.mark.parametrize("override, cause", [("seqlen=abc", ValidationError), ("seqln=5", ConfigAttributeError)])
def test_types_and_typos_fail_when_hydra_composes(override, cause):
    with pytest.raises(ConfigCompositionException) as info:
        load(override)
    assert isinstance(info.value.__cause__, cause)
