"""Entry point: `python -m experiments.paper [figure=fig2|fig3|fig4|fig7|fig8|table5|tables67|tables89|table10|nsa_table4|figs5_6|all]
[results_dir=results] [out_dir=results/paper]` (configs/paper.yaml)."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.paper.decode_tables import nsa_table4, table10, tables89
from experiments.paper.e2e_figures import figs5_6
from experiments.paper.figures import fig2, fig3, fig4, fig7, fig8
from experiments.paper.measured import load_measured
from experiments.paper.tables import table5, tables67
from experiments.schema import PAPER_FIGURES, register_configs, validate_paper

register_configs()

MAKERS = {"fig2": fig2, "fig3": fig3, "fig4": fig4, "fig7": fig7, "fig8": fig8, "table5": table5,
          "tables67": tables67, "tables89": tables89, "table10": table10, "nsa_table4": nsa_table4, "figs5_6": figs5_6}
assert tuple(MAKERS) == PAPER_FIGURES


@hydra.main(version_base="1.3", config_path="../../configs", config_name="paper")
def main(cfg: DictConfig) -> None:
    paper = validate_paper(cfg)
    out = Path(paper.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = load_measured(Path(paper.results_dir))
    if df.empty:
        print(f"no measured sweep rows under {paper.results_dir}/ (timings need CUDA): writing the theory "
              "figure and the paper's tables with 'not measured'")
    for name in PAPER_FIGURES if paper.figure == "all" else (paper.figure,):
        (out / f"{name}.md").write_text(MAKERS[name](df, out) + "\n")
        made = [p.name for p in (out / f"{name}.md", out / f"{name}.png") if p.exists()]
        print(f"{name}: {', '.join(made)}")


if __name__ == "__main__":
    main()
