"""experiments.paper: Table 5 reads the preset's g only, uncertain paper labels are flagged, every
page cites the paper's figure or table, and `python -m experiments.paper figure=...` runs."""
import subprocess
import sys
from pathlib import Path

import pandas as pd

from experiments.paper import figures, measured, numbers
from experiments.paper import tables as paper_tables
from experiments.points import COLUMNS, Point, make_row
from tests.experiments.test_plots import META, synthetic_rows

REPO = Path(__file__).resolve().parents[2]


def write_sweep(results: Path, name: str, rows: list) -> None:
    (results / name).mkdir(parents=True)
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(results / name / "results.csv", index=False)


def table5_row(g: int, n: int, bs: int, t: int, gb: float, status: str = "ok") -> dict:
    point = Point("selected", g, 4, 128, n, 1, bs, t, "bfloat16", "nsa")
    return make_row(point, "fsa", "fwd", status, META, median_ms=1.0, peak_extra_mem_gb=gb)


def table5_cells(md: str) -> dict:
    """(preset, N) -> the "ours peak extra GB" cell."""
    cells = {}
    for line in md.splitlines():
        parts = [c.strip() for c in line.strip("|").split("|")]
        if len(parts) == 5 and parts[1].isdigit():
            cells[parts[0], int(parts[1])] = parts[3]
    return cells


def test_table5_shows_the_presets_g_and_says_not_measured_without_it(tmp_path):
    """g=8 needs more buffer (here 3.0 GB vs 0.6 GB at g=1): it must never stand in for g=1."""
    rows = [table5_row(1, 32768, 64, 16, 0.6), table5_row(1, 65536, 64, 16, 1.2),
            table5_row(1, 32768, 128, 8, float("nan"), status="oom")]
    rows += [table5_row(8, n, bs, t, 3.0) for (bs, t), by_n in numbers.TABLE5.items() for n in by_n]
    write_sweep(tmp_path, "table5", rows)
    out = tmp_path / "paper"
    out.mkdir()
    md = paper_tables.table5(measured.load_measured(tmp_path), out)
    cells = table5_cells(md)
    assert cells["(64,16)", 32768] == "0.6" and cells["(64,16)", 65536] == "1.2", md
    assert cells["(64,16)", 131072] == "not measured" and cells["(128,8)", 65536] == "not measured", md
    assert cells["(128,8)", 32768] == "oom", md
    assert "| 1.15 |" in md  # ours / paper at (64,16) 32K: 0.6 / 0.52
    assert (out / "table5.png").stat().st_size > 0


def test_uncertain_fig4_labels_are_flagged_and_pages_cite_the_paper(tmp_path):
    write_sweep(tmp_path, "fig7_8", synthetic_rows(q_heads=64).to_dict("records"))
    df = measured.load_measured(tmp_path)
    out = tmp_path / "paper"
    out.mkdir()
    fig4 = figures.fig4(df, out)
    flagged = [line for line in fig4.splitlines() if f"1.1{numbers.UNCERTAIN} |" in line]
    assert len(flagged) == 1 and flagged[0].startswith("| (128,8) | 1 | 16384 |"), fig4
    assert sum(line.count(numbers.UNCERTAIN + " |") for line in fig4.splitlines()) == len(numbers.FIG4_UNCERTAIN)
    assert numbers.UNCERTAIN_NOTE in fig4 and (out / "fig4.png").stat().st_size > 0
    pages = {"Figure 2": figures.fig2(df, out), "Figure 4": fig4, "Figure 7": figures.fig7(df, out),
             "Table 5": paper_tables.table5(df, out), "Tables 6 (H20) and 7 (H200)": paper_tables.tables67(df, out)}
    for cite, page in pages.items():
        assert f"Paper: {numbers.SOURCE}, {cite}" in page and "NUMBERS.md" not in page, page[:400]


def test_paper_command_writes_one_figure(tmp_path):
    write_sweep(tmp_path, "fig4", synthetic_rows(q_heads=64).to_dict("records"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.paper", "figure=fig4", f"results_dir={tmp_path}",
                           f"out_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fig4: fig4.md, fig4.png" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["fig4.md", "fig4.png"]
    assert "Fake GPU 80GB" in (out / "fig4.md").read_text()


def e2e_rows(gpu: str, ms: dict) -> list:
    """Rows of one `python -m experiments.e2e` job (Llama3-8B, 64K, (128, 8)): backend -> train ms."""
    from experiments import e2e

    rows = []
    for backend, value in ms.items():
        bs, t = (0, 0) if backend == "dense" else (128, 8)
        rows.append(dict(model="llama3_8b", layers=2, seqlen=65536, backend=backend, block_size=bs, topk=t,
                         step="train", dtype="bfloat16", ms=value, status="ok", message="", gpu=gpu,
                         torch="2.11", triton="3.6.0", git_commit="abc1234", timestamp="2026-11-27T00:00:00+00:00"))
    return [{c: r.get(c) for c in e2e.COLUMNS} for r in rows]


def test_figs5_6_put_each_e2e_folder_beside_the_paper(tmp_path):
    """Figure 5's Llama3-8B (128, 8) 64K row shows FSA over NSA / over dense of every e2e folder (its own
    keys: the sweep's would fold its rows into one), the paper's 1.25 / 2.47, and 'not measured' for
    the points no folder has."""
    from experiments.paper.e2e_figures import figs5_6

    for name, gpu, ms in (("e2e_a", "Fake H100", dict(dense=800.0, nsa=600.0, fsa=500.0)),
                          ("e2e_b", "Fake H200", dict(dense=700.0, nsa=550.0, fsa=440.0))):
        (tmp_path / name).mkdir()
        pd.DataFrame(e2e_rows(gpu, ms)).to_csv(tmp_path / name / "results.csv", index=False)
    md = figs5_6(measured.load_measured(tmp_path), tmp_path)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| fig5 | llama3_8b | (128,8) | 65536")]
    assert [r[7:9] for r in rows] == [["1.2", "1.6"], ["1.25", "1.59"]]
    assert all(r[4:6] == ["1.25", "2.47"] for r in rows) and "e2e_a" in rows[0][9] and "Fake H200" in rows[1][9]
    assert "| fig6 | llama3_8b | (128,8) | 65536 | 1.27 | 1.69 |  | not measured | not measured |" in md
