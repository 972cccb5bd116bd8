"""Train the reference model (tiny ComfyUI Wan 2.1 over 32x32 digits) and its judging classifier.

    .venv/bin/python -m harness.train_reference                 # the shipped run (CPU, 2 threads)
    .venv/bin/python -m harness.train_reference --smoke         # 3-minute end-to-end check

Steps, in order (all seeded):
1. Data (:mod:`harness.reference_data`): a training set (seed 0) and a held-out set (seed 1),
   cached under ``artifacts/reference_data/``.
2. Classifier (:class:`harness.reference_model.Classifier`) on the training set, with mild Gaussian
   noise as augmentation; its accuracy on the held-out set is printed.
3. Diffusion: rectified flow in the model's own space (see :mod:`harness.reference_model`), AdamW,
   noise levels drawn logit-normally and shifted by the sampling shift (more training where the
   digit's shape is decided), warm-up then cosine decay over
   ``progress = max(step / steps, elapsed / time budget)``, EMA of the weights, 10% of the classes dropped to the unconditional context, the first text-embedding
   layer's learning rate scaled by 1/64 (its input is a dense 4096-dim context), cross-attention
   output projections zero-initialized (a first run without these two and with a data recipe whose
   classes shared one pixel mean ignored its class entirely). The run is reproducible
   when the step count, not the time budget, ends it. For speed on CPU the training forward uses
   PyTorch's SDPA for attention (ComfyUI picks sub-quadratic attention on CPU; same math).
4. Both the raw and the EMA weights are saved in fp16 with ComfyUI's key names, loaded back through
   ``comfy.sd.load_diffusion_model`` and sampled through ``comfy.sample.sample``; the classifier
   scores the samples; the better of the two is kept as the weights file, and the accuracy of
   full-compute samples is printed for several shifts and cfg values, with a PNG grid
   (rows = classes).
5. The shipped run (``--out`` the default weights file) then calibrates the model on
   :data:`MAP_PROBE` and ships its solver map in ``calibrations/`` (``--map-only`` does just that).

The shipped weights: 6,500 steps of batch 32 in 57.9 min with 2 threads on this project's 2-core
machine, ended by the step count; 77% of full-compute samples read as their class at cfg 1, 89.5%
at cfg 2.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import comfy_runtime
from . import reference_data as data
from . import reference_model as ref

ROOT = Path(__file__).resolve().parent.parent
DATA_CACHE = ROOT / "artifacts" / "reference_data"
TRAIN_SEED, TEST_SEED = 0, 1


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    path = DATA_CACHE / f"recipe{data.RECIPE}_seed{seed}_n{n}.npz"
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


def train_classifier(train_x, train_y, test_x, test_y, epochs: int, seed: int) -> ref.Classifier:
    torch.manual_seed(seed)
    classifier = ref.Classifier()
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
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, held-out accuracy {accuracy:.4f}, "
            f"{time.time() - start:.0f} s")
    return classifier.eval()


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of ComfyUI's flow sampling (ModelSamplingDiscreteFlow.time_snr_shift)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def train_diffusion(train_x, train_y, args):
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.wan.model as wan_module

    torch.manual_seed(args.seed)
    _, wan = ref.build_untrained(seed=args.seed)
    device = torch.device(args.device)
    wan.to(device).train()
    params = [p for p in wan.parameters()]
    ema = [p.detach().clone() for p in params]
    # The first text-embedding layer reads dense 4096-dim contexts: Adam moves every weight by ~lr
    # per step, which moves its outputs by ~lr * sum|context| (~2.6 at lr 8e-4), so the class signal
    # would be noise the network learns to ignore. Its learning rate is scaled by 1/sqrt(4096).
    text_in = wan.text_embedding[0].weight
    groups = {"text_in": [], "decay": [], "other": []}
    for n, p in wan.named_parameters():
        key = "text_in" if p is text_in else "decay" if p.ndim >= 2 and "modulation" not in n else "other"
        groups[key].append(p)
    lr_scale = {"text_in": 1 / math.sqrt(ref.TEXT_DIM), "decay": 1.0, "other": 1.0}
    optimizer = torch.optim.AdamW([{"params": groups["text_in"], "weight_decay": 0.0, "name": "text_in"},
                                   {"params": groups["decay"], "weight_decay": 0.01, "name": "decay"},
                                   {"params": groups["other"], "weight_decay": 0.0, "name": "other"}],
                                  lr=args.lr, betas=(0.9, 0.99), eps=1e-8)
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
    probe_noise = torch.randn(probe_z.shape, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    probe_labels = torch.from_numpy(train_y[probe_idx])

    def class_gap(sigma=0.7):
        xt = (1 - sigma) * probe_z + sigma * probe_noise
        t = torch.full((len(probe_z),), sigma * 1000, device=device)
        with torch.no_grad():
            right, wrong = (F.mse_loss(wan(xt, t, ref.context_batch(labels).to(device)), probe_noise - probe_z).item()
                            for labels in (probe_labels, (probe_labels + 3) % data.NUM_CLASSES))
        return wrong - right

    original_attention = wan_module.optimized_attention
    wan_module.optimized_attention = attention.attention_pytorch
    try:
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
            labels[torch.rand(args.batch, generator=generator) < args.uncond] = data.NUM_CLASSES
            context = ref.context_batch(labels)
            sigma = shifted(torch.sigmoid(torch.randn(args.batch, generator=generator)), args.train_shift)
            noise = torch.randn(z0.shape, generator=generator)
            # drawn on the CPU whatever the device, so a GPU run sees the same batches
            z0, context, sigma, noise = (t.to(device) for t in (z0, context, sigma, noise))
            s = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - s) * z0 + s * noise
            velocity = wan(xt, sigma * 1000, context)
            loss = F.mse_loss(velocity, noise - z0)

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
                    f"class gap {class_gap():.4f}, "
                    f"{step / (now - start):.2f} steps/s, {(now - start) / 60:.1f} min")
                last_report = now
            if args.checkpoint and now - last_checkpoint > 300:
                torch.save({"step": step, "raw": wan.state_dict(),
                            "ema": dict(zip([n for n, _ in wan.named_parameters()], ema))}, args.checkpoint)
                last_checkpoint = now
    finally:
        wan_module.optimized_attention = original_attention
    minutes = (time.time() - start) / 60
    stopped_by = "time budget" if step < args.steps else "step count"
    log(f"diffusion trained: {step} steps of batch {args.batch} in {minutes:.1f} min (ended by {stopped_by}), "
        f"final loss {np.mean(losses[-200:]):.4f} (mean of last 200 steps)")
    wan.eval()
    raw = ref.state_dict_for_file(wan)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    ema_state = ref.state_dict_for_file(wan)
    return raw, ema_state, dict(steps=step, minutes=minutes, final_loss=float(np.mean(losses[-200:])))


@torch.no_grad()
def evaluate(model, classifier, per_class: int, steps: int, cfg: float, seed: int, batch: int = 50):
    """Accuracy of ``classifier`` on ``per_class`` full-compute samples per class, and the images."""
    labels = np.tile(np.arange(data.NUM_CLASSES), per_class)
    images = []
    for i in range(0, len(labels), batch):
        latent = ref.sample(model, labels[i:i + batch], seed=seed + i, steps=steps, cfg=cfg)
        images.append(ref.decode(latent))
    images = torch.cat(images)
    predicted = classifier.predict(images).numpy()
    return float((predicted == labels).mean()), images, labels


def sample_grid(images: torch.Tensor, labels: np.ndarray, per_row: int) -> "data.Image.Image":
    order = np.concatenate([np.flatnonzero(labels == c)[:per_row] for c in range(data.NUM_CLASSES)])
    pixels = (images[order].numpy() * 255).round().astype(np.uint8)
    return data.grid(pixels, per_row, scale=3)


# The probe the shipped solver map comes from (and quality benchmark's calibration): one pair, N=6.
MAP_PROBE = dict(label=0, seed=0, steps=50, interval=6, warmup=3)


def ship_map(weights: Path) -> Path:
    """Calibrate the model at ``weights`` on :data:`MAP_PROBE` and save its solver map in the
    package's ``calibrations/``, replacing the map of earlier reference weights."""
    from . import node_pack

    pack = node_pack.load()
    map_store = pack.nodes.map_store
    model = ref.load(weights)
    schedule = pack.hyca_core.schedule.Schedule(interval=MAP_PROBE["interval"], warmup=MAP_PROBE["warmup"])
    solver_map, _ = pack.nodes.calibrate_node.probe(
        model, MAP_PROBE["seed"], MAP_PROBE["steps"], 1.0, "euler", "simple", ref.conditioning([MAP_PROBE["label"]]),
        ref.unconditional(1), {"samples": ref.empty_latent(1)}, schedule)
    for old in map_store.SHIPPED.glob(f"{solver_map.architecture.rsplit('.', 1)[-1]}-*.hyca.safetensors"):
        old.unlink()
    path = solver_map.save(map_store.SHIPPED / map_store.file_name(solver_map))
    log(f"solver map shipped: {path.relative_to(ROOT)}")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3-minute end-to-end check, writes under artifacts/")
    parser.add_argument("--map-only", action="store_true", help="only calibrate --out's weights and ship their map")
    parser.add_argument("--steps", type=int, default=6500, help="diffusion optimizer steps (upper bound)")
    parser.add_argument("--minutes", type=float, default=58.0, help="diffusion training time budget (upper bound)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="training device (e.g. cuda); sampling uses ComfyUI's choice")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=150)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--train-shift", type=float, default=ref.SHIFT,
                        help="noise levels drawn logit-normally, then shifted like sampling with this shift")
    parser.add_argument("--uncond", type=float, default=0.1, help="share of samples trained unconditionally")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=40000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--classifier-images", type=int, default=16000, help="first N training images")
    parser.add_argument("--classifier-epochs", type=int, default=2)
    parser.add_argument("--reuse-classifier", type=Path, help="load this classifier instead of training one")
    parser.add_argument("--eval-per-class", type=int, default=20)
    parser.add_argument("--report-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=ref.WEIGHTS)
    parser.add_argument("--classifier-out", type=Path, default=ref.CLASSIFIER_WEIGHTS)
    parser.add_argument("--grid", type=Path, default=ROOT / "output" / "reference_samples.png")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "artifacts" / "reference_train_checkpoint.pt")
    args = parser.parse_args(argv)
    if args.map_only:
        ship_map(args.out)
        return
    if args.smoke:
        smoke = ROOT / "artifacts" / "reference_smoke"
        args.minutes, args.train_size, args.test_size = 1.5, 4000, 500
        args.classifier_epochs, args.eval_per_class, args.report_s, args.warmup = 3, 5, 15.0, 30
        args.out, args.classifier_out = smoke / "reference_wan.safetensors", smoke / "reference_classifier.safetensors"
        args.grid, args.checkpoint = smoke / "samples.png", None

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    comfy_runtime.load()
    from safetensors.torch import save_file

    total_start = time.time()
    train_x, train_y = dataset(args.train_size, TRAIN_SEED)
    test_x, test_y = dataset(args.test_size, TEST_SEED)

    if args.reuse_classifier:
        classifier = ref.load_classifier(args.reuse_classifier)
    else:
        n = min(args.classifier_images, len(train_x))
        classifier = train_classifier(train_x[:n], train_y[:n], test_x, test_y, args.classifier_epochs, args.seed)
        args.classifier_out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(args.classifier_out))
        classifier = ref.load_classifier(args.classifier_out)
    real_accuracy = float((classifier.predict(as_images(test_x)).numpy() == test_y).mean())
    log(f"classifier held-out real accuracy {real_accuracy:.4f} on {len(test_y)}")

    raw, ema, info = train_diffusion(train_x, train_y, args)

    results = {}
    for name, state in (("ema", ema), ("raw", raw)):
        path = args.out.with_name(args.out.stem + f".{name}.safetensors")
        save_file(state, str(path))
        model = ref.load(path, shift=ref.SHIFT)
        accuracy, _, _ = evaluate(model, classifier, args.eval_per_class, ref.STEPS, 1.0, seed=12345)
        results[name] = (accuracy, path)
        log(f"{name} weights: full-compute sample accuracy {accuracy:.3f} "
            f"(shift {ref.SHIFT}, {ref.STEPS} euler steps, cfg 1.0)")
    best = max(results, key=lambda k: results[k][0])
    os.replace(results[best][1], args.out)
    for name, (_, path) in results.items():
        if name != best and path.exists():
            path.unlink()
    log(f"kept the {best} weights: {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")

    base = ref.load(args.out, shift=None)
    settings = [(shift, 1.0, ref.STEPS) for shift in (1.0, 2.0, 3.0, 8.0)]
    settings += [(ref.SHIFT, 2.0, ref.STEPS), (ref.SHIFT, 1.0, 20), (ref.SHIFT, 1.0, 50)]
    for shift, cfg, steps in settings:
        accuracy, images, labels = evaluate(ref.with_shift(base, shift), classifier, args.eval_per_class, steps,
                                            cfg, seed=777)
        log(f"full-compute samples, shift {shift}, cfg {cfg}, {steps} euler/simple steps: "
            f"accuracy {accuracy:.3f} on {len(labels)}")
        if (shift, cfg, steps) == (ref.SHIFT, 1.0, ref.STEPS):
            args.grid.parent.mkdir(parents=True, exist_ok=True)
            sample_grid(images, labels, min(10, args.eval_per_class)).save(args.grid)

    log(f"SUMMARY: classifier held-out real accuracy {real_accuracy:.4f}; diffusion {info['steps']} steps, "
        f"{info['minutes']:.1f} min, final loss {info['final_loss']:.4f}; kept {best} "
        f"(accuracy {results[best][0]:.3f}); grid {args.grid}; total {(time.time() - total_start) / 60:.1f} min")
    if args.out.resolve() == ref.WEIGHTS.resolve():
        ship_map(args.out)


if __name__ == "__main__":
    main()
