"""The FlashInfer peer of the decode bench, on CPU: the slimmed wheel keeps the batch-decode sources
and a consistent RECORD, and without the package the timing says why in one row instead of failing."""
import sys
import zipfile

from experiments import decode_timing
from experiments.flashinfer_wheel import DROP, main, slim


def make_wheel(path):
    names = ["flashinfer/__init__.py", "flashinfer/data/csrc/batch_decode.cu", "flashinfer/data/include/flashinfer/x.cuh",
             "flashinfer/data/csrc/cake_sampling/big.cuh", "flashinfer/data/cutlass/examples/e.cu",
             "flashinfer/data/csrc/alphamoe_nvfp4_sm100.cu"]
    record = [f"{n},sha256=x,1" for n in names] + ["flashinfer_python-0.1.dist-info/RECORD,,"]
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            z.writestr(n, "x")
        z.writestr("flashinfer_python-0.1.dist-info/RECORD", "\n".join(record) + "\n")


def test_slim_wheel_drops_only_the_listed_trees_and_rewrites_record(tmp_path):
    wheel = tmp_path / "flashinfer_python-0.1-py3-none-any.whl"
    make_wheel(wheel)
    out = slim(wheel, tmp_path / "out")
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        record = {ln.split(",", 1)[0] for ln in z.read("flashinfer_python-0.1.dist-info/RECORD").decode().splitlines()}
    assert names == {"flashinfer/__init__.py", "flashinfer/data/csrc/batch_decode.cu",
                     "flashinfer/data/include/flashinfer/x.cuh", "flashinfer_python-0.1.dist-info/RECORD"}
    assert record == names and not any(n.startswith(DROP) for n in names)
    assert main([str(tmp_path / "missing.whl")]) == 2  # a bad argument: status 2, nothing written
    assert main([str(wheel), "--out", str(tmp_path)]) == 2  # writing over the wheel itself is refused
    with zipfile.ZipFile(wheel) as z:
        assert len(z.namelist()) == 7  # the source wheel is untouched


def test_flashinfer_rows_say_why_when_the_package_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer -> ImportError
    rows = decode_timing.time_flashinfer(None, None, None, ("eager", "graph"))
    assert len(rows) == 1 and rows[0][:3] == ("flashinfer", "eager", None) and "ModuleNotFoundError" in rows[0][3]


def test_hnd_pages_hold_each_sequence_in_order():
    import torch
    from experiments.decode_timing import to_hnd_pages
    x = torch.randn(3, 2, 48, 4)
    pages = to_hnd_pages(x, 16)
    assert pages.shape == (9, 2, 16, 4)
    for b in range(3):
        for j in range(3):
            assert torch.equal(pages[b * 3 + j], x[b, :, j * 16:(j + 1) * 16])


def test_flashinfer_is_a_decode_peer_only():
    """Not in the prefill sweep's `all` preset; any other scope, or a float32 cache, is unsupported."""
    from experiments.points import Point
    from experiments.schema import KERNEL_PRESETS
    from experiments.timed_calls import unsupported_reason

    assert "flashinfer" not in KERNEL_PRESETS["all"]
    module = Point("module", 4, 8, 128, 65536, 1, 64, 16, "bfloat16", "nsa")
    assert "only scope=decode" in unsupported_reason("flashinfer", module, check_installed=False)
    decode = Point("decode", 4, 8, 128, 65536, 8, 64, 16, "bfloat16", "nsa")
    assert unsupported_reason("flashinfer", decode, check_installed=False) is None
    fp32 = Point("decode", 4, 8, 128, 65536, 8, 64, 16, "float32", "nsa")
    assert "float32" in unsupported_reason("flashinfer", fp32, check_installed=False)
