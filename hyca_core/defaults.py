"""The defaults every entry point shares, stated once: the nodes' widgets, `apply_hyca`, `Schedule()`
and `run_maps.run_map` all read them from here, so a demo, a test and a workflow run the same HyCa.
"""

INTERVAL = 4  # one full computation every N steps after the warm-up
# Steps always computed first. It also bounds the predictors' history (a solver needs as many past
# residuals as its order), and so the memory the history holds; the benchmark in the README compares it.
WARMUP = 2
FINAL_STEPS = 0  # last steps always computed
FITTED = False  # the paper's fixed solver weights, not least-squares fitted ones
