"""The benchmark harness: Hydra sweeps of NSA vs FSA kernels, the analytic cost model, plots, paper figures."""
