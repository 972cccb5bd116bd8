"""Distill the FLUX-layout reference model into its few-step student (:mod:`harness.reference_student`).

    .venv/bin/python -m harness.distill_student --threads 1     # the shipped run (CPU)
    .venv/bin/python -m harness.distill_student --smoke         # 3-minute end-to-end check

Steps, in order (all seeded):
1. Teacher trajectories: ``--trajectories`` seeded noises, classes in turn, integrated by Euler on the
   teacher's 48-step simple grid at shift :data:`~harness.reference_student.SHIFT` and cfg
   :data:`~harness.reference_student.TEACHER_CFG`; the 4-step simple grid is a subset of it, and the
   states at its points are kept (fp16) with the trajectory's end.
2. Student: initialized from the teacher, trained so that one Euler step from the teacher's state at a
   point of the 4-step grid lands on the teacher's state at the next point (the velocity of that
   chord as the target), AdamW, cosine decay, EMA. (A first version trained the end of the trajectory
   as the target at every point of the fine grid, for any step count; its 4-step output strayed further
   from the teacher's: README, few-step distilled models.)
3. The EMA weights are saved in fp16 (ComfyUI's FLUX key names), loaded back through the student's
   loader and sampled through ``comfy.sample.sample`` at 4 and 8 steps, cfg 1: the classifier's
   accuracy on them and their PSNR to the teacher's own 50-step output through ComfyUI (held-out
   seeds) are printed.
4. The shipped run then calibrates the student on its ``MAP_PROBE`` and ships its solver map.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import comfy_runtime, metrics
from . import reference_flux as teacher_ref
from . import reference_student as student_ref
from .train_reference import ROOT, log, ship_map

TEACHER_GRID = 48


def grid_sigmas(model, steps: int) -> torch.Tensor:
    """The sigmas of ComfyUI's simple scheduler for ``model`` (as KSampler computes them)."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).float()


@torch.no_grad()
def trajectories(velocity, sigmas: torch.Tensor, keep: list[int], count: int, seed: int, cfg: float,
                 batch: int = 100):
    """(states (count, len(keep) + 1, C, H, W) fp16, labels (count,)): Euler on ``sigmas`` from seeded
    noise, cfg against the unconditional row; the states at the ``keep`` indices of ``sigmas`` and the end."""
    num_classes = teacher_ref.NUM_CLASSES
    labels = torch.arange(count) % num_classes
    shape = (teacher_ref.LATENT_CHANNELS, teacher_ref.LATENT_SIZE, teacher_ref.LATENT_SIZE)
    noise = torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))
    states = torch.empty((count, len(keep) + 1, *shape), dtype=torch.float16)
    start = time.time()
    for i in range(0, count, batch):
        x = noise[i:i + batch] * sigmas[0]
        cond = labels[i:i + batch]
        both = torch.cat([cond, torch.full_like(cond, num_classes)])
        for k in range(len(sigmas) - 1):
            if k in keep:
                states[i:i + batch, keep.index(k)] = x.half()
            v_cond, v_uncond = velocity(torch.cat([x, x]), sigmas[k].expand(2 * len(x)), both).chunk(2)
            x = x + (sigmas[k + 1] - sigmas[k]) * (v_uncond + cfg * (v_cond - v_uncond))
        states[i:i + batch, -1] = x.half()
        log(f"teacher trajectories {min(i + batch, count)}/{count}, {time.time() - start:.0f} s")
    return states, labels


def distill(net, states, labels, sigmas, args) -> dict:
    """Train ``net`` in place (then hold its EMA weights) on the trajectories' states at ``sigmas`` (the
    student's grid, its final 0 included); returns a summary."""
    params = list(net.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(teacher_ref.param_groups(net), lr=args.lr, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(args.seed)
    count, points = states.shape[0], states.shape[1] - 1
    start, losses, step, last_report = time.time(), [], 0, time.time()
    net.train()
    with teacher_ref.training_forward(net) as velocity:
        while True:
            progress = max(step / args.steps, (time.time() - start) / (args.minutes * 60))
            if progress >= 1:
                break
            lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            which = torch.randint(count, (args.batch,), generator=generator)
            point = torch.randint(points, (args.batch,), generator=generator)
            x, target = states[which, point].float(), states[which, point + 1].float()
            step_size = (sigmas[point + 1] - sigmas[point]).view(-1, 1, 1, 1)
            chord = (target - x) / step_size  # one Euler step with this velocity lands on the target
            loss = torch.nn.functional.mse_loss(velocity(x, sigmas[point], labels[which]), chord)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            with torch.no_grad():
                decay = min(args.ema, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            losses.append(loss.item())
            if time.time() - last_report > args.report_s:
                log(f"step {step}: loss {np.mean(losses[-100:]):.5f} (last 100), lr {lr:.2e}, "
                    f"{(time.time() - start) / 60:.1f} min")
                last_report = time.time()
    net.eval()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    minutes = (time.time() - start) / 60
    return dict(steps=step, minutes=minutes, final_loss=float(np.mean(losses[-200:])))


@torch.no_grad()
def report(weights: Path, classifier, per_class: int, seed: int = 4242) -> dict:
    """Accuracy and PSNR to the teacher's 50-step cfg-2 output (through ComfyUI) at 4 and 8 steps."""
    labels = list(range(teacher_ref.NUM_CLASSES)) * per_class
    reference = teacher_ref.sample(teacher_ref.load(), labels, seed=seed, steps=student_ref.TEACHER_STEPS,
                                   cfg=student_ref.TEACHER_CFG)
    student = student_ref.load(weights)
    figures = {}
    for steps in (2, 4, 8):
        latent = student_ref.sample(student, labels, seed=seed, steps=steps)
        accuracy = float((classifier.predict(student_ref.decode(latent)).numpy() == np.array(labels)).mean())
        psnr = float(np.mean([metrics.latent_psnr(a, b) for a, b in zip(latent, reference)]))
        figures[steps] = (accuracy, psnr)
        log(f"student at {steps} euler/simple steps, cfg 1: accuracy {accuracy:.3f} on {len(labels)}, "
            f"latent PSNR to the teacher's {student_ref.TEACHER_STEPS} steps cfg {student_ref.TEACHER_CFG}: "
            f"{psnr:.2f} dB")
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="3-minute end-to-end check, writes under artifacts/")
    parser.add_argument("--trajectories", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (upper bound)")
    parser.add_argument("--minutes", type=float, default=35.0, help="distillation time budget (upper bound)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-per-class", type=int, default=10)
    parser.add_argument("--report-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=student_ref.WEIGHTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.trajectories, args.minutes, args.eval_per_class, args.report_s = 40, 1.0, 2, 15.0
        args.out = ROOT / "artifacts" / "reference_student_smoke" / student_ref.WEIGHTS.name
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    comfy_runtime.load()
    from safetensors.torch import save_file

    total = time.time()
    model = teacher_ref.load()
    sigmas = grid_sigmas(model, TEACHER_GRID)
    grid = grid_sigmas(model, student_ref.STEPS)
    keep = [int(torch.argmin((sigmas - s).abs())) for s in grid[:-1]]
    if not torch.allclose(sigmas[keep], grid[:-1]):
        raise RuntimeError("the student's grid is not a subset of the teacher's")
    net = model.model.diffusion_model.float()
    with teacher_ref.training_forward(net) as velocity:
        states, labels = trajectories(velocity, sigmas, keep, args.trajectories, args.seed,
                                      student_ref.TEACHER_CFG)
    torch.manual_seed(args.seed)
    info = distill(net, states, labels, grid, args)
    log(f"student distilled: {info['steps']} steps of batch {args.batch} in {info['minutes']:.1f} min, "
        f"final loss {info['final_loss']:.5f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(teacher_ref.state_dict_for_file(net), str(args.out))  # net holds the EMA weights
    log(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    report(args.out, teacher_ref.load_classifier(), args.eval_per_class)
    log(f"total {(time.time() - total) / 60:.1f} min")
    if args.out.resolve() == student_ref.WEIGHTS.resolve():
        ship_map(student_ref, args.out)


if __name__ == "__main__":
    main()
