"""The methods the benchmark compares: HyCa's variants, the caching peers (FORA, Taylor,
TaylorSeer, every single pool solver through HyCa's own map path, ComfyUI's EasyCache and
LazyCache) and stock samplers with fewer steps. Each is a :class:`Method`: a patched model and how
to sample it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from hyca_core import defaults

STEPS = 50
WARMUP = defaults.WARMUP  # HyCa Apply's
ABLATION_N = 6  # the interval of the single-solver ablation and the targets
PAPER_WARMUP = 3  # the earlier default, run beside it: one more full step at the start, longer histories
SAMPLERS = ("euler", "dpmpp_2m", "res_multistep", "uni_pc")  # what artists sample with
FEWER_STEP_SAMPLERS = ("euler", "dpmpp_2m", "res_multistep")
PEERS = (("reuse", "FORA"), ("taylor1", "Taylor"), ("taylorseer2", "TaylorSeer"))


@dataclass
class Method:
    name: str
    family: str
    model: Any  # the ModelPatcher sampled
    steps: int = STEPS
    sampler: str = "euler"
    n: int | None = None
    key: tuple = ()
    note: str = ""
    memory_known: bool = True  # HyCa logs its history peak; the stock caches do not


def copying_input(model):
    """A clone of ``model`` whose model_sampling hands the diffusion model a copy of the latent.

    ComfyUI's flow sampling (CONST) passes the latent itself as the model input when no dtype
    cast is needed (fp32 weights, as here on the CPU), and stock EasyCache, on a skipped step,
    adds its cached difference to that input in place and returns it as the output: the latent
    the output is then combined with has changed under it. In bf16/fp16 the cast copies, so
    users on GPUs do not see this; the copy here gives EasyCache the same conditions.
    """
    sampling = model.get_model_object("model_sampling")
    base = type(sampling)

    class CopyingInput(base):
        def calculate_input(self, sigma, noise):
            return base.calculate_input(self, sigma, noise).clone()

    copied = copy.copy(sampling)
    copied.__class__ = CopyingInput
    patched = model.clone()
    patched.add_object_patch("model_sampling", copied)
    return patched


class Methods:
    """Builds the methods on one base model and one calibrated solver map."""

    def __init__(self, pack, model, solver_map):
        self.pack = pack
        self.model = model
        self.solver_map = solver_map
        self.Schedule = pack.hyca_core.schedule.Schedule

    def hyca(self, n: int, fitted: bool = True, single_solver=None, warmup: int = WARMUP,
             placement: str = "fixed"):
        return self.pack.nodes.apply_hyca.apply_hyca(
            self.model, self.solver_map, self.Schedule(interval=n, warmup=warmup), fitted=fitted,
            single_solver=single_solver, placement=placement)

    def computed_steps(self, n: int, steps: int = STEPS) -> int:
        """The full steps HyCa computes at interval n (Apply's warm-up): fewer steps' equal compute."""
        return int(self.Schedule(interval=n, warmup=WARMUP).mask(steps).sum())

    def hyca_pair(self, n: int, steps: int = STEPS, sampler: str = "euler", prefix: str = "") -> list[Method]:
        """HyCa with the paper's fixed solvers and with fitted ones."""
        return [Method(f"{prefix}HyCa {kind} N={n}", f"{prefix}HyCa {kind}", self.hyca(n, kind == "fitted"),
                       steps=steps, sampler=sampler, n=n, key=(kind, n)) for kind in ("fixed", "fitted")]

    def peers(self, n: int) -> list[Method]:
        """FORA, first-order Taylor and TaylorSeer on the every-N schedule, each with the warm-up its
        solver needs."""
        solver = self.pack.hyca_core.solvers.solver
        return [Method(f"{family} ({name}/step) N={n}", family,
                       self.hyca(n, single_solver=(name, "step"), warmup=max(WARMUP, solver(name).history)),
                       n=n, key=(name, "step", n)) for name, family in PEERS]

    def placements(self, n: int) -> list[Method]:
        """The same budget of full steps placed by the probe (calibrated), TaylorSeer on that schedule
        too (the table separates what the schedule and the solvers give), and the earlier warm-up."""
        methods = [Method(f"HyCa calibrated {kind} N={n} budget", "HyCa calibrated",
                          self.hyca(n, kind == "fitted", placement="calibrated"), n=n,
                          key=(f"calibrated {kind}", n)) for kind in ("fixed", "fitted")]
        methods.append(Method(f"TaylorSeer on HyCa's calibrated schedule, N={n} budget",
                              "TaylorSeer calibrated",
                              self.hyca(n, single_solver=("taylorseer2", "step"), placement="calibrated",
                                        warmup=self.pack.hyca_core.solvers.solver("taylorseer2").history),
                              n=n, key=("taylorseer2", "calibrated", n)))
        methods += [Method(f"HyCa {place} N={n} warm-up {PAPER_WARMUP}", f"HyCa warm-up {PAPER_WARMUP}",
                           self.hyca(n, False, warmup=PAPER_WARMUP, placement=place), n=n,
                           key=(f"{place} warm-up {PAPER_WARMUP}", n)) for place in ("fixed", "calibrated")]
        return methods

    def single_solvers(self, n: int, variables, skip) -> list[Method]:
        """Every pool member alone (the paper's ablation); members that need 4 residuals get a
        warm-up of 4 (with fewer they cannot predict the first predicted step)."""
        methods = []
        for s in self.pack.hyca_core.solvers.POOL:
            for variable in variables:
                if (s.name, variable, n) in skip:
                    continue
                warmup = max(WARMUP, s.history)
                methods.append(Method(f"only {s.name}/{variable} N={n}" + ("" if warmup == WARMUP else
                                      f" (warm-up {warmup})"), "single solver",
                                      self.hyca(n, single_solver=(s.name, variable), warmup=warmup), n=n,
                                      key=(s.name, variable, n)))
        return methods

    def fewer_steps(self, sampler: str, steps: int, family: str, label: str, n: int | None = None) -> Method:
        return Method(f"{sampler} {steps} steps ({label})", family, self.model, steps=steps, sampler=sampler,
                      n=n, key=(sampler, steps))

    def caches(self, thresholds, stock_thresholds) -> list[Method]:
        """ComfyUI's EasyCache / LazyCache at their default start/end percent (0.15 / 0.95); EasyCache
        also with its input copied (see :func:`copying_input`)."""
        from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

        copied = copying_input(self.model)
        methods = []
        for threshold in sorted(set(thresholds) | set(stock_thresholds)):
            if threshold in stock_thresholds:
                methods.append(Method(f"EasyCache thr={threshold}", "EasyCache",
                                      EasyCacheNode.execute(self.model, threshold, 0.15, 0.95, False)[0],
                                      memory_known=False))
            if threshold in thresholds:
                methods.append(Method(f"EasyCache (input copied) thr={threshold}", "EasyCache (input copied)",
                                      EasyCacheNode.execute(copied, threshold, 0.15, 0.95, False)[0],
                                      memory_known=False))
                methods.append(Method(f"LazyCache thr={threshold}", "LazyCache",
                                      LazyCacheNode.execute(self.model, threshold, 0.15, 0.95, False)[0],
                                      memory_known=False))
        return methods
