"""Train a reference model (a tiny ComfyUI DiT over 32x32 rendered images) and its judging classifier.

    .venv/bin/python -m harness.train_reference                 # the shipped Wan run (CPU, 2 threads)
    .venv/bin/python -m harness.train_reference --model flux    # the shipped FLUX run
    .venv/bin/python -m harness.train_reference --smoke         # 3-minute end-to-end check

``--model`` picks the model's module (:data:`MODELS`), which holds what is specific to it: its data
recipe (``DATA``), config and builder, initialization, optimizer groups, training forward and
conditioning, the recommended shift / steps / cfg, the training defaults (``TRAINING``) and the map
probe. The steps below are shared.

Steps, in order (all seeded):
1. Data (the model's ``DATA`` module): a training set (seed 0) and a held-out set (seed 1),
   cached under ``artifacts/<data module>/``.
2. Classifier (:class:`harness.reference_model.Classifier`) on the training set, with mild Gaussian
   noise as augmentation; its accuracy on the held-out set is printed.
3. Diffusion: rectified flow in the model's own space (see :mod:`harness.reference_model`), AdamW,
   noise levels drawn logit-normally and shifted by the sampling shift (more training where the
   image's shape is decided), warm-up then cosine decay over
   ``progress = max(step / steps, elapsed / time budget)``, EMA of the weights, 10% of the classes
   dropped to the unconditional conditioning. The run is reproducible when the step count, not the
   time budget, ends it. Wan: the first text-embedding layer's learning rate scaled by 1/64 (its
   input is a dense 4096-dim context), cross-attention output projections zero-initialized (a first
   run without these two and with a data recipe whose classes shared one pixel mean ignored its
   class entirely). FLUX: adaLN-zero initialization and an out-of-place block forward
   (:mod:`harness.flux_training`), checked against ComfyUI's forward at the end.
4. Both the raw and the EMA weights are saved in fp16 with ComfyUI's key names, loaded back through
   the model's loader (``comfy.sd.load_diffusion_model`` for Wan) and sampled through
   ``comfy.sample.sample``; the classifier scores the samples; the better of the two is kept as the
   weights file, and the accuracy of full-compute samples is printed for several shifts and cfg
   values, with a PNG grid (rows = classes).
5. The shipped run (``--out`` the model's default weights file) then calibrates the model on its
   ``MAP_PROBE`` and ships its solver map in ``calibrations/`` (``--map-only`` does just that).

The shipped runs' commands: Wan ``--threads 2`` (ended by its step count), FLUX ``--threads 1
--eval-per-class 10`` with ``--reuse-classifier`` of the classifier from a first, aborted run (one
thread, not two, on a busy 2-core machine: two threads wait for each other at every parallel
region). The SD3-layout weights came from stages, each ``--init`` of the one before (the README's
"third model" has the commands, and every stage's figures). Steps, minutes and accuracies of each
shipped run are in the README, from this script's final log.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import comfy_runtime
from . import reference_model

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SEED, TEST_SEED = 0, 1
# --model -> the module holding that model's specifics (see the module docstring)
MODELS = {"wan": "harness.reference_model", "flux": "harness.reference_flux",
          "sd3": "harness.reference_sd3"}
# every shipped reference model's module, the distilled student too (its weights come from
# harness/distill_student.py)
REFERENCE_MODULES = [*MODELS.values(), "harness.reference_student"]
# The (class, seed) pair a second map is probed on, to report how far the shipped map's clusters
# depend on its probe.
SECOND_PROBE = dict(label=5, seed=1)


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def dataset(data, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    path = ROOT / "artifacts" / data.__name__.rsplit(".", 1)[-1] / f"recipe{data.RECIPE}_seed{seed}_n{n}.npz"
    if path.is_file():
        cached = np.load(path)
        return cached["images"], cached["labels"]
    start = time.time()
    images, labels = data.make_dataset(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels)
    log(f"rendered {n} images (seed {seed}) in {time.time() - start:.0f} s")
    return images, labels


def as_images(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).float() / 255.0


def train_classifier(train_x, train_y, test_x, test_y, epochs: int, seed: int) -> reference_model.Classifier:
    torch.manual_seed(seed)
    classifier = reference_model.Classifier()
    batch = 128
    steps = epochs * (len(train_x) // batch)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(train_y)
    start, step = time.time(), 0
    classifier.train()
    for epoch in range(epochs):
        order = rng.permutation(len(train_x))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            images = as_images(train_x[idx])
            sigma = torch.rand(len(idx), 1, 1, 1) * 0.06  # mild noise: samples are never pixel-perfect
            images = (images + sigma * torch.randn_like(images)).clamp(0, 1)
            loss = F.cross_entropy(classifier(images), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
        accuracy = (classifier.predict(as_images(test_x)).numpy() == test_y).mean()
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, "
            f"held-out accuracy {accuracy:.4f}, {time.time() - start:.0f} s")
    return classifier.eval()


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of ComfyUI's flow sampling (ModelSamplingDiscreteFlow.time_snr_shift)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def train_diffusion(ref, train_x, train_y, args):
    torch.manual_seed(args.seed)
    _, net = ref.build_untrained(seed=args.seed)
    if args.init:  # a second stage: the weights of an earlier run, in the file format
        from safetensors.torch import load_file

        net.load_state_dict({k: v.float() for k, v in load_file(str(args.init)).items()})
        log(f"starting from {args.init}")
    device = torch.device(args.device)
    net.to(device).train()
    params = [p for p in net.parameters()]
    ema = [p.detach().clone() for p in params]
    groups = ref.param_groups(net)
    lr_scale = {group["name"]: group.pop("lr_scale") for group in groups}
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
    log(f"diffusion model: {sum(p.numel() for p in params):,} parameters, config {ref.UNET_CONFIG}")

    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    labels_all = torch.from_numpy(train_y)
    budget = args.minutes * 60
    start = time.time()
    losses, step, last_report, last_checkpoint = [], 0, start, start
    # a fixed probe batch: the loss with the right class vs. a wrong one shows the class is used
    probe_idx = np.random.default_rng(args.seed + 1).integers(0, len(train_x), size=64)
    probe_z = ref.image_to_model_space(as_images(train_x[probe_idx])).to(device)
    probe_generator = torch.Generator().manual_seed(args.seed + 1)
    probe_noise = torch.randn(probe_z.shape, generator=probe_generator).to(device)
    probe_labels = torch.from_numpy(train_y[probe_idx])
    num_classes = ref.DATA.NUM_CLASSES

    def class_gap(velocity, sigma=0.7):
        xt = (1 - sigma) * probe_z + sigma * probe_noise
        t = torch.full((len(probe_z),), sigma, device=device)
        with torch.no_grad():
            right, wrong = (F.mse_loss(velocity(xt, t, labels), probe_noise - probe_z).item()
                            for labels in (probe_labels, (probe_labels + 3) % num_classes))
        return wrong - right

    with ref.training_forward(net) as velocity:
        while True:
            elapsed = time.time() - start
            progress = max(step / args.steps, elapsed / budget)
            if progress >= 1.0:
                break
            warm = min(1.0, (step + 1) / args.warmup)
            lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_scale[group["name"]]

            idx = rng.integers(0, len(train_x), size=args.batch)
            z0 = ref.image_to_model_space(as_images(train_x[idx]))
            labels = labels_all[idx].clone()
            labels[torch.rand(args.batch, generator=generator) < args.uncond] = num_classes
            sigma = shifted(torch.sigmoid(torch.randn(args.batch, generator=generator)), args.train_shift)
            noise = torch.randn(z0.shape, generator=generator)
            # drawn on the CPU whatever the device, so a GPU run sees the same batches
            z0, sigma, noise = (t.to(device) for t in (z0, sigma, noise))
            s = sigma.view(-1, *[1] * (z0.ndim - 1))
            xt = (1 - s) * z0 + s * noise
            loss = F.mse_loss(velocity(xt, sigma, labels), noise - z0)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
            losses.append(loss.item())

            now = time.time()
            if now - last_report > args.report_s:
                log(f"step {step}: loss {np.mean(losses[-100:]):.4f} (last 100), lr {lr:.2e}, "
                    f"class gap {class_gap(velocity):.4f}, "
                    f"{step / (now - start):.2f} steps/s, {(now - start) / 60:.1f} min")
                last_report = now
            if args.checkpoint and now - last_checkpoint > 300:
                torch.save({"step": step, "raw": net.state_dict(),
                            "ema": dict(zip([n for n, _ in net.named_parameters()], ema))}, args.checkpoint)
                last_checkpoint = now
    minutes = (time.time() - start) / 60
    stopped_by = "time budget" if step < args.steps else "step count"
    log(f"diffusion trained: {step} steps of batch {args.batch} in {minutes:.1f} min "
        f"(ended by {stopped_by}), final loss {np.mean(losses[-200:]):.4f} (mean of last 200 steps)")
    net.eval()
    raw = ref.state_dict_for_file(net)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    ema_state = ref.state_dict_for_file(net)
    return raw, ema_state, dict(steps=step, minutes=minutes, final_loss=float(np.mean(losses[-200:])))


@torch.no_grad()
def evaluate(ref, model, classifier, per_class: int, steps: int, cfg: float, seed: int, batch: int = 50):
    """Accuracy of ``classifier`` on ``per_class`` full-compute samples per class, and the images."""
    labels = np.tile(np.arange(ref.DATA.NUM_CLASSES), per_class)
    images = []
    for i in range(0, len(labels), batch):
        latent = ref.sample(model, labels[i:i + batch], seed=seed + i, steps=steps, cfg=cfg)
        images.append(ref.decode(latent))
    images = torch.cat(images)
    predicted = classifier.predict(images).numpy()
    return float((predicted == labels).mean()), images, labels


def sample_grid(data, images: torch.Tensor, labels: np.ndarray, per_row: int):
    order = np.concatenate([np.flatnonzero(labels == c)[:per_row] for c in range(data.NUM_CLASSES)])
    pixels = (images[order].numpy() * 255).round().astype(np.uint8)
    return data.grid(pixels, per_row, scale=3)


def ship_map(ref, weights: Path) -> Path:
    """Calibrate the model at ``weights`` on its ``MAP_PROBE`` and save its solver map in the
    package's ``calibrations/``, replacing the map of earlier weights of the same architecture.
    Logs the map's solver mix and its cluster agreement (adjusted Rand index) with a map probed on
    another class and seed (:data:`SECOND_PROBE`)."""
    from . import node_pack

    pack = node_pack.load()
    map_store = pack.nodes.map_store
    model = ref.load(weights)
    probe = ref.MAP_PROBE

    def probe_map(label, seed):
        schedule = pack.hyca_core.schedule.Schedule(interval=probe["interval"], warmup=probe["warmup"])
        solver_map, _ = pack.nodes.calibrate_node.probe(
            model, seed, probe["steps"], probe["cfg"], "euler", "simple", ref.conditioning([label]),
            ref.unconditional(1), {"samples": ref.empty_latent(1)}, schedule)
        return solver_map

    solver_map = probe_map(probe["label"], probe["seed"])
    # earlier weights' maps go; the other reference models' (a student shares its teacher's family) stay
    modules = [importlib.import_module(name) for name in REFERENCE_MODULES]
    others = {map_store.fingerprint(module.load()) for module in modules if module.WEIGHTS.is_file()}
    for old in map_store.SHIPPED.glob(f"{solver_map.architecture.rsplit('.', 1)[-1]}-*.hyca.safetensors"):
        if not any(fingerprint in old.name for fingerprint in others):
            old.unlink()
    path = solver_map.save(map_store.SHIPPED / map_store.file_name(solver_map))
    log(f"solver map shipped: {path.relative_to(ROOT)}")
    other = probe_map(**SECOND_PROBE)
    log(f"against a probe on class {SECOND_PROBE['label']}, seed {SECOND_PROBE['seed']}:\n"
        + pack.nodes.inspector_node.summary(solver_map, other))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="wan", help="which reference model")
    parser.add_argument("--smoke", action="store_true",
                        help="3-minute end-to-end check, writes under artifacts/")
    parser.add_argument("--map-only", action="store_true",
                        help="only calibrate --out's weights and ship their map")
    parser.add_argument("--steps", type=int, help="diffusion optimizer steps (upper bound; model's default)")
    parser.add_argument("--minutes", type=float, help="diffusion training time budget (upper bound)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu",
                        help="training device (e.g. cuda); sampling uses ComfyUI's choice")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--ema", type=float)
    parser.add_argument("--train-shift", type=float,
                        help="noise levels drawn logit-normally, then shifted like sampling with this shift "
                             "(default: the model's sampling shift)")
    parser.add_argument("--uncond", type=float, help="share of samples trained unconditionally (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=40000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--classifier-images", type=int, default=16000, help="first N training images")
    parser.add_argument("--classifier-epochs", type=int, default=2)
    parser.add_argument("--reuse-classifier", type=Path, help="load this classifier instead of training one")
    parser.add_argument("--init", type=Path,
                        help="start from these weights (an earlier run's file), not a fresh initialization")
    parser.add_argument("--eval-per-class", type=int, default=20)
    parser.add_argument("--report-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, help="weights file (default: the model's shipped file)")
    parser.add_argument("--classifier-out", type=Path)
    parser.add_argument("--grid", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args(argv)
    ref = importlib.import_module(MODELS[args.model])
    for key, value in ref.TRAINING.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.train_shift = ref.SHIFT if args.train_shift is None else args.train_shift
    args.uncond = 0.1 if args.uncond is None else args.uncond
    args.out = args.out or ref.WEIGHTS
    args.classifier_out = args.classifier_out or ref.CLASSIFIER_WEIGHTS
    args.grid = args.grid or ROOT / "output" / f"reference_{args.model}_samples.png"
    args.checkpoint = args.checkpoint or ROOT / "artifacts" / f"reference_{args.model}_train_checkpoint.pt"
    if args.map_only:
        ship_map(ref, args.out)
        return
    if args.smoke:
        smoke = ROOT / "artifacts" / f"reference_{args.model}_smoke"
        args.minutes, args.train_size, args.test_size = 1.5, 4000, 500
        args.classifier_epochs, args.eval_per_class, args.report_s, args.warmup = 3, 5, 15.0, 30
        args.out, args.classifier_out = smoke / ref.WEIGHTS.name, smoke / ref.CLASSIFIER_WEIGHTS.name
        args.grid, args.checkpoint = smoke / "samples.png", None

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    comfy_runtime.load()
    from safetensors.torch import save_file

    total_start = time.time()
    train_x, train_y = dataset(ref.DATA, args.train_size, TRAIN_SEED)
    test_x, test_y = dataset(ref.DATA, args.test_size, TEST_SEED)

    if args.reuse_classifier:
        classifier = ref.load_classifier(args.reuse_classifier)
    else:
        n = min(args.classifier_images, len(train_x))
        classifier = train_classifier(train_x[:n], train_y[:n], test_x, test_y, args.classifier_epochs,
                                      args.seed)
        args.classifier_out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(args.classifier_out))
        classifier = ref.load_classifier(args.classifier_out)
    real_accuracy = float((classifier.predict(as_images(test_x)).numpy() == test_y).mean())
    log(f"classifier held-out real accuracy {real_accuracy:.4f} on {len(test_y)}")

    raw, ema, info = train_diffusion(ref, train_x, train_y, args)

    results = {}
    for name, state in (("ema", ema), ("raw", raw)):
        path = args.out.with_name(args.out.stem + f".{name}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
        model = ref.load(path, shift=ref.SHIFT)
        accuracy, _, _ = evaluate(ref, model, classifier, args.eval_per_class, ref.STEPS, ref.CFG, seed=12345)
        results[name] = (accuracy, path)
        log(f"{name} weights: full-compute sample accuracy {accuracy:.3f} "
            f"(shift {ref.SHIFT}, {ref.STEPS} euler steps, cfg {ref.CFG})")
    best = max(results, key=lambda k: results[k][0])
    os.replace(results[best][1], args.out)
    for name, (_, path) in results.items():
        if name != best and path.exists():
            path.unlink()
    log(f"kept the {best} weights: {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    report_accuracy(ref, args.out, classifier, args.eval_per_class, args.grid)

    log(f"SUMMARY: classifier held-out real accuracy {real_accuracy:.4f}; diffusion {info['steps']} steps, "
        f"{info['minutes']:.1f} min, final loss {info['final_loss']:.4f}; kept {best} "
        f"(accuracy {results[best][0]:.3f}); grid {args.grid}; "
        f"total {(time.time() - total_start) / 60:.1f} min")
    if args.out.resolve() == ref.WEIGHTS.resolve():
        ship_map(ref, args.out)


def report_accuracy(ref, weights: Path, classifier, per_class: int, grid: Path) -> None:
    """Log the accuracy of full-compute samples at several shifts, cfg values and step counts; save a
    grid of the samples at the recommended shift, steps and cfg."""
    base = ref.load(weights, shift=None)
    settings = [(shift, ref.CFG, ref.STEPS) for shift in (1.0, 2.0, 3.0, 8.0)]
    settings += [(ref.SHIFT, cfg, ref.STEPS) for cfg in sorted({1.0, 2.0, 4.0} - {ref.CFG})]
    settings += [(ref.SHIFT, ref.CFG, 20), (ref.SHIFT, ref.CFG, 50)]
    for shift, cfg, steps in settings:
        accuracy, images, labels = evaluate(ref, ref.with_shift(base, shift), classifier, per_class, steps,
                                            cfg, seed=777)
        log(f"full-compute samples, shift {shift}, cfg {cfg}, {steps} euler/simple steps: "
            f"accuracy {accuracy:.3f} on {len(labels)}")
        if (shift, cfg, steps) == (ref.SHIFT, ref.CFG, ref.STEPS):
            grid.parent.mkdir(parents=True, exist_ok=True)
            sample_grid(ref.DATA, images, labels, min(10, per_class)).save(grid)


if __name__ == "__main__":
    main()
