"""The FSA paper's figures and tables beside ours: `python -m experiments.paper [figure=...]` writes a
PNG and a markdown table per figure under results/paper/, with the paper's number, ours (read from
the sweep CSVs under results/, "not measured" where no sweep has the point) and the ratio ours /
paper, naming the GPU. Without measurements it still writes the theory figure (Figure 2) and every
table, and says so.

Rows are read from every folder's results.csv and rows/ (a sweep cut short still counts).
Which sweep feeds what (each is `python -m experiments.sweep paper=<preset>`): fig3 -> Figure 3,
fig4 -> Figure 4, fig7_8 (+ fig8_selected) -> Figures 7 and 8, table5 -> Table 5, tables67 -> Tables 6-7.

    numbers.py   the paper's numbers, with their source tags
    measured.py  our rows: loading, picking one GPU's, "not measured"
    figures.py   Figures 2, 3, 4, 7, 8
    tables.py    Table 5, Tables 6-7
    decode_tables.py  Tables 8-9 (generate), Table 10 (decode), NSA Table 4 (analytic)
    e2e_figures.py  Figures 5-6 (training step, prefill of real models; the e2e folders' rows)
    __main__.py  the Hydra entry point
"""
