"""The FSA paper's numbers (arXiv 2508.18224, ICLR 2026), each with the figure or table it comes
from and a source tag: [text] printed in the paper, [fig-label] a bar label recovered from the PDF,
[inferred] derived from the paper's formulas, [?] uncertain (kept, and flagged in our tables and
figures: see `flag` and FIG4_UNCERTAIN)."""
from __future__ import annotations

SOURCE = "FSA paper (arXiv 2508.18224)"
PRESETS = ((64, 16), (128, 8))
SEQLENS_FIG4 = (8192, 16384, 32768, 65536)

# Figure 2 [inferred], (64, 16): FSA/NSA memory traffic and FLOPs from the App. E formulas.
FIG2_INFERRED = {1: (0.066, 0.188), 2: (0.115, 0.313), 4: (0.213, 0.563), 8: (0.409, 1.06)}
FIG2_TEXT = {"memory": 0.213, "flops": 0.562}  # [text] g=4, 64K, (64, 16)

# Figure 4 [fig-label]: (gpu, block_size, topk, g) -> (NSA/FSA at 8K..64K, FA/FSA at 8K..64K).
# fwd+bwd of compressed + selected + window; probably 64 query heads, d = 128 [inferred].
FIG4 = {
    ("H20", 64, 16, 1): ((1.7, 2.3, 2.6, 2.3), (0.4, 1.1, 2.2, 3.6)),
    ("H20", 64, 16, 2): ((1.2, 1.6, 1.7, 1.7), (0.5, 1.2, 2.5, 4.6)),
    ("H20", 64, 16, 4): ((1.0, 1.2, 1.3, 1.3), (0.7, 1.6, 3.3, 5.5)),
    ("H20", 64, 16, 8): ((1.0, 1.0, 1.0, 1.0), (1.1, 2.1, 3.8, 6.1)),
    ("H20", 128, 8, 1): ((2.4, 3.0, 3.5, 3.0), (0.5, 1.1, 2.4, 3.8)),
    ("H20", 128, 8, 2): ((1.5, 2.1, 2.2, 2.2), (0.5, 1.3, 2.6, 4.9)),
    ("H20", 128, 8, 4): ((1.1, 1.5, 1.7, 1.6), (0.6, 1.7, 3.4, 5.8)),
    ("H20", 128, 8, 8): ((1.0, 1.0, 1.1, 1.2), (0.9, 1.9, 3.6, 6.4)),
    ("H200", 64, 16, 1): ((1.2, 2.6, 2.4, 2.1), (0.2, 0.8, 1.4, 2.4)),
    ("H200", 64, 16, 2): ((1.0, 1.3, 1.6, 1.6), (0.3, 0.9, 2.0, 3.5)),
    ("H200", 64, 16, 4): ((1.0, 1.0, 1.2, 1.2), (0.6, 1.8, 2.5, 4.3)),
    ("H200", 64, 16, 8): ((1.0, 1.0, 1.0, 1.0), (0.9, 1.7, 3.2, 5.1)),
    ("H200", 128, 8, 1): ((1.5, 1.1, 2.9, 2.6), (0.2, 0.6, 1.5, 2.7)),
    ("H200", 128, 8, 2): ((1.2, 1.7, 2.3, 2.1), (0.3, 0.9, 2.3, 3.8)),
    ("H200", 128, 8, 4): ((1.0, 1.2, 1.6, 1.5), (0.5, 1.0, 2.7, 4.6)),
    ("H200", 128, 8, 8): ((1.0, 1.0, 1.1, 1.1), (0.7, 1.4, 2.9, 4.9)),
}
# Figure 4 labels marked [?]: (gpu, block_size, topk, g, series, N), series "nsa" = NSA/FSA, "fa" = FA/FSA.
# The text's stated maximum vs FA on H200 is 4.9, not the 5.1 read here.
FIG4_UNCERTAIN = {
    ("H200", 64, 16, 1, "nsa", 65536), ("H200", 64, 16, 1, "fa", 65536),
    ("H200", 64, 16, 8, "fa", 65536), ("H200", 128, 8, 1, "nsa", 16384),
}
UNCERTAIN = "?"  # suffix of an uncertain paper value in our tables; the figures mark the point with it
UNCERTAIN_NOTE = (f"A paper value ending in {UNCERTAIN} is an uncertain label (recovered from the PDF's text "
                  "and not settled by the paper's stated averages and maxima); ratios use it as read.")


def flag(value: float, uncertain: bool) -> object:
    """A paper value as our tables print it: with the UNCERTAIN suffix when its label is uncertain."""
    return f"{value:g}{UNCERTAIN}" if uncertain else value

# Figure 7 [text]: FSA speedup over NSA and over full attention, forward and backward (max, mean).
FIG7 = {
    ("fwd", "nsa"): (2.36, 1.62), ("fwd", "sdpa"): (3.23, 1.83),
    ("bwd", "nsa"): (4.32, 2.59), ("bwd", "sdpa"): (7.45, 6.89),
}
# Figure 8 [text]: share of the selected branch in NSA attention time (max, mean), and FSA's
# selected-branch speedup over NSA (max, mean).
FIG8_SELECTED_SHARE = (0.79, 0.65)
FIG8_SELECTED_SPEEDUP = (7.6, 3.4)

# Table 5 [text]: FSA buffer memory in GB, d = 128 (head counts not stated).
TABLE5 = {
    (64, 16): {32768: 0.52, 65536: 1.88, 131072: 5.01, 262144: 12.36},
    (128, 8): {32768: 0.26, 65536: 0.91, 131072: 2.28, 262144: 6.15},
}

# Tables 6 (H20) and 7 (H200) [text]: seconds; 64 query heads, d = 128, kv heads 64 / g.
# (block_size, topk, g, N) -> (FSA fwd, NSA fwd, FA fwd, FSA F+B, NSA F+B, FA F+B).
TABLE67_COLUMNS = (("fsa", "fwd"), ("nsa", "fwd"), ("sdpa", "fwd"), ("fsa", "fwd+bwd"), ("nsa", "fwd+bwd"),
                   ("sdpa", "fwd+bwd"))
TABLE6_H20 = {
    (64, 16, 1, 131072): (1.42, 2.08, 2.64, 2.36, 4.51, 12.08),
    (64, 16, 1, 262144): (6.40, 7.18, 10.5, 8.70, 13.29, 48.23),
    (64, 16, 2, 131072): (0.87, 1.17, 2.62, 1.79, 2.71, 12.04),
    (64, 16, 2, 262144): (3.74, 4.07, 10.53, 6.03, 8.43, 48.27),
    (64, 16, 4, 131072): (0.52, 0.61, 2.65, 1.43, 1.75, 12.07),
    (64, 16, 4, 262144): (2.41, 2.44, 10.52, 4.66, 5.98, 48.24),
    (64, 16, 8, 131072): (0.45, 0.45, 2.61, 1.38, 1.39, 12.05),
    (64, 16, 8, 262144): (1.63, 1.64, 10.51, 3.99, 4.75, 48.26),
    (128, 8, 1, 131072): (1.24, 1.68, 2.64, 2.15, 3.50, 12.08),
    (128, 8, 1, 262144): (5.34, 7.50, 10.5, 7.56, 13.65, 48.23),
    (128, 8, 2, 131072): (0.90, 1.29, 2.62, 1.66, 2.22, 12.04),
    (128, 8, 2, 262144): (3.18, 4.24, 10.53, 5.40, 8.33, 48.27),
    (128, 8, 4, 131072): (0.45, 0.49, 2.65, 1.35, 1.52, 12.07),
    (128, 8, 4, 262144): (2.10, 2.53, 10.52, 4.29, 5.55, 48.24),
    (128, 8, 8, 131072): (0.42, 0.43, 2.61, 1.31, 1.41, 12.05),
    (128, 8, 8, 262144): (1.56, 1.68, 10.51, 3.74, 4.17, 48.28),
}
TABLE7_H200 = {
    (64, 16, 1, 131072): (0.78, 1.01, 1.01, 1.12, 2.17, 4.70),
    (64, 16, 1, 262144): (3.92, 3.97, 3.96, 4.81, 6.99, 18.75),
    (64, 16, 2, 131072): (0.46, 0.57, 0.98, 0.80, 1.24, 4.68),
    (64, 16, 2, 262144): (2.14, 2.17, 3.98, 3.04, 4.12, 18.77),
    (64, 16, 4, 131072): (0.27, 0.33, 0.99, 0.60, 0.82, 4.71),
    (64, 16, 4, 262144): (1.20, 1.29, 3.99, 2.15, 2.70, 18.76),
    (64, 16, 8, 131072): (0.18, 0.18, 0.97, 0.50, 0.52, 4.67),
    (64, 16, 8, 262144): (0.73, 0.73, 3.97, 1.72, 2.01, 18.78),
    (128, 8, 1, 131072): (0.65, 1.20, 1.00, 0.97, 2.47, 4.70),
    (128, 8, 1, 262144): (3.16, 4.10, 3.96, 3.99, 6.79, 18.75),
    (128, 8, 2, 131072): (0.38, 0.66, 0.98, 0.70, 1.40, 4.68),
    (128, 8, 2, 262144): (1.76, 2.21, 3.99, 2.58, 3.90, 18.77),
    (128, 8, 4, 131072): (0.21, 0.28, 0.99, 0.53, 0.73, 4.71),
    (128, 8, 4, 262144): (1.06, 1.24, 3.97, 1.87, 2.44, 18.76),
    (128, 8, 8, 131072): (0.17, 0.20, 0.97, 0.48, 0.58, 4.67),
    (128, 8, 8, 262144): (0.71, 0.75, 3.95, 1.52, 1.70, 18.78),
}

# End to end (H200 only: the GPU our e2e rows compare with), % speed-up of FSA = baseline / FSA - 1.
# Figures 5 (training) and 6 (prefill) [fig-label]: (model, block_size, topk) ->
# ((vs NSA 32K, vs NSA 64K), (vs FA 32K, vs FA 64K)); FA is Triton FlashAttention-2 (ours: SDPA).
FIG5_H200 = {
    ("llama3_8b", 64, 16): ((6, 10), (44, 135)), ("llama3_8b", 128, 8): ((20, 25), (48, 147)),
    ("qwen3_14b", 64, 16): ((0, 5), (52, 132)), ("qwen3_14b", 128, 8): ((14, 16), (58, 140)),
    ("qwen2_5_32b", 64, 16): ((0, 4), (39, 105)), ("qwen2_5_32b", 128, 8): ((10, 13), (42, 112)),
}
FIG6_H200 = {
    ("llama3_8b", 64, 16): ((3, 0), (8, 42)), ("llama3_8b", 128, 8): ((20, 27), (15, 69)),
    ("qwen3_14b", 64, 16): ((5, 2), (14, 41)), ("qwen3_14b", 128, 8): ((18, 16), (21, 51)),
    ("qwen2_5_32b", 64, 16): ((0, 1), (9, 47)), ("qwen2_5_32b", 128, 8): ((28, 36), (13, 59)),
}
# Labels marked [?] in Figures 5-6: (figure, model, block_size, topk, series "nsa" | "fa", N).
E2E_UNCERTAIN = {("fig5", "qwen3_14b", 64, 16, "nsa", 32768), ("fig5", "qwen2_5_32b", 64, 16, "nsa", 32768),
                 ("fig6", "qwen2_5_32b", 64, 16, "nsa", 32768)}
# Figure 10 [text]: attention time of the training step (128, 8), 32K-64K, FSA over NSA and over FA (max, mean).
FIG10_ATTENTION = {"nsa": (1.4, 1.23), "fa": (3.87, 2.91)}
# Tables 14-15 [text], H200, TP = 1: Llama3-8B end-to-end inference seconds (block_size, topk, N) -> (FSA, NSA).
TABLE14_15_H200_TP1 = {(64, 16, 32768): (1.95, 1.97), (64, 16, 65536): (4.51, 4.61),
                       (128, 8, 32768): (1.82, 2.37), (128, 8, 65536): (3.61, 4.62)}

# Tables 8 (H20) and 9 (H200) [text]: prefill + 512 generated tokens, seconds; 64 query heads, d = 128.
# (gpu, kernel, block_size, topk) -> {g: (128K, 256K)}; FA (kernel "sdpa") has no preset (None, None).
TABLE89 = {
    ("H20", "fsa", 64, 16): {1: (1.67, 6.71), 2: (1.12, 4.05), 4: (0.77, 2.72), 8: (0.70, 1.94)},
    ("H20", "fsa", 128, 8): {1: (1.49, 5.65), 2: (1.15, 3.49), 4: (0.70, 2.41), 8: (0.67, 1.87)},
    ("H20", "nsa", 64, 16): {1: (2.33, 7.49), 2: (1.42, 4.38), 4: (0.86, 2.75), 8: (0.70, 1.95)},
    ("H20", "nsa", 128, 8): {1: (1.93, 7.81), 2: (1.54, 4.55), 4: (0.74, 2.84), 8: (0.68, 1.99)},
    ("H20", "sdpa", None, None): {1: (4.34, 13.45), 2: (4.32, 13.48), 4: (4.35, 13.47), 8: (4.31, 13.46)},
    ("H200", "fsa", 64, 16): {1: (1.06, 4.24), 2: (0.74, 2.46), 4: (0.55, 1.52), 8: (0.46, 1.05)},
    ("H200", "fsa", 128, 8): {1: (0.93, 3.48), 2: (0.66, 2.08), 4: (0.49, 1.38), 8: (0.45, 1.03)},
    ("H200", "nsa", 64, 16): {1: (1.29, 4.29), 2: (0.85, 2.49), 4: (0.61, 1.61), 8: (0.46, 1.05)},
    ("H200", "nsa", 128, 8): {1: (1.48, 4.42), 2: (0.94, 2.53), 4: (0.56, 1.56), 8: (0.48, 1.07)},
    ("H200", "sdpa", None, None): {1: (1.88, 4.86), 2: (1.85, 4.88), 4: (1.86, 4.89), 8: (1.84, 4.87)},
}
TABLE89_SEQLENS = (131072, 262144)
TABLE89_STEPS = 512
# Table 10 [text]: decode ms per token (averaged over 1K generated tokens), 64 heads, d = 128, (64, 16),
# g not stated. N -> {gpu: (FlashDecoding, NSA, FSA)}.
TABLE10 = {32768: {"H20": (0.88, 0.46, 0.45), "H200": (0.51, 0.48, 0.47)},
           65536: {"H20": (1.71, 0.46, 0.48), "H200": (0.88, 0.53, 0.54)},
           131072: {"H20": (3.32, 0.50, 0.48), "H200": (1.70, 0.55, 0.54)},
           262144: {"H20": (5.76, 0.62, 0.61), "H200": (1.75, 0.62, 0.63)}}
# NSA paper (arXiv 2502.11089) Table 4 [text]: decoding memory access per attention op in tokens and
# the expected speedup over full attention (tokens L / NSA's): N -> (NSA tokens, expected x).
NSA_SOURCE = "NSA paper (arXiv 2502.11089)"
NSA_TABLE4 = {8192: (2048, 4.0), 16384: (2560, 6.4), 32768: (3584, 9.1), 65536: (5632, 11.6)}
