"""The few-step reference model: a 4-step student of the FLUX-layout reference model, guidance baked in.

What FLUX.1-schnell and the Lightning LoRAs are to their teachers, at this project's size: the same
architecture and files as :mod:`harness.reference_flux` (so the same loader, conditioning and latent),
other weights (:data:`WEIGHTS`), trained by ``python -m harness.distill_student`` to land in a few
steps at cfg 1 where its teacher lands in 50 steps at cfg :data:`TEACHER_CFG`.

- **Distillation**: trajectory-endpoint (consistency) distillation. The teacher's ODE is integrated
  from seeded noise on a fine grid; at every point ``(x_s, s)`` of a trajectory the student is trained
  so that ``x_s - s * v_student(x_s, s)`` is the trajectory's end. An Euler step of any size then
  moves towards the teacher's output, so the student samples at 4 steps (recommended) and at 8.
- **Recommended sampling**: euler / simple, :data:`STEPS` steps, cfg 1, shift :data:`SHIFT`.
"""

from __future__ import annotations

import functools

from . import model_files
from . import reference_flux as teacher
from .reference_flux import (  # noqa: F401  (the student shares its teacher's interface)
    CLASSIFIER_WEIGHTS, DATA, SHIFT, UNET_CONFIG, conditioning, decode, empty_latent, encode,
    image_to_model_space,
    load_classifier, unconditional, with_shift,
)

WEIGHTS = teacher.WEIGHTS.with_name("reference_flux_student.safetensors")
TEACHER_STEPS = 50
TEACHER_CFG = 2.0  # the teacher's best setting by its classifier (README)
STEPS = 4
CFG = 1.0
# The probe the shipped map comes from: the student's own field on a fine grid (a 4-step run holds
# too few steps to measure the indicators), N=6 as for the other models.
MAP_PROBE = dict(label=0, seed=0, steps=50, interval=6, warmup=3, cfg=CFG)


def load(path=None, shift: float | None = SHIFT):
    """The student as its teacher is loaded (:func:`harness.reference_flux.load`)."""
    model = model_files.load_diffusion_model(path if path is not None else WEIGHTS, "flux", teacher.HEADS,
                                             "flux (then python -m harness.distill_student)")
    return with_shift(model, shift) if shift is not None else model


sample = functools.partial(teacher.sample, steps=STEPS, cfg=CFG)
