"""Per-request samplers: one diffusers noise scheduler instance per image, built from templates.

In stepserve, "scheduler" is the batch planner (scheduler.py); diffusers' noise schedulers
are called samplers everywhere, as users know them.

Every image owns its sampler (multistep samplers keep a history of model outputs, and
ancestral samplers draw noise from the image's own generator), so requests with different
samplers and step counts share a batched forward without touching each other's state.
Building a sampler from its config costs milliseconds; a template per (sampler, steps) is
built once and deep-copied per image.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from .types import Sampler

# diffusers' schedulers share no typed interface (step / set_timesteps / scale_model_input
# live on each class), so a sampler instance is typed as Any here.
DiffusersSampler = Any

SAMPLER_CLASSES: dict[Sampler, Any] = {
    Sampler.EULER: EulerDiscreteScheduler,
    Sampler.EULER_ANCESTRAL: EulerAncestralDiscreteScheduler,
    Sampler.DDIM: DDIMScheduler,
    Sampler.DPM_SOLVER_MULTISTEP: DPMSolverMultistepScheduler,
    Sampler.LCM: LCMScheduler,
}
# The general-purpose samplers (any model not distilled for a sampler of its own).
GENERAL_SAMPLERS = (Sampler.EULER, Sampler.EULER_ANCESTRAL, Sampler.DDIM, Sampler.DPM_SOLVER_MULTISTEP)
# Samplers whose diffusers class takes ``use_karras_sigmas``.
KARRAS_SAMPLERS = tuple(
    s
    for s, cls in SAMPLER_CLASSES.items()
    if "use_karras_sigmas" in inspect.signature(cls.__init__).parameters
)


def sampler_for_class_name(name: str) -> Sampler | None:
    """The Sampler whose diffusers class is called ``name`` (a model's configured default)."""
    for sampler, cls in SAMPLER_CLASSES.items():
        if cls.__name__ == name:
            return sampler
    return None


def make_sampler(base_config: Any, sampler: Sampler, karras: bool = False) -> DiffusersSampler:
    """A fresh sampler of ``sampler``'s diffusers class, configured like the model's own."""
    if karras:
        if sampler not in KARRAS_SAMPLERS:
            raise ValueError(f"{sampler.value} has no Karras sigmas option")
        return SAMPLER_CLASSES[sampler].from_config(base_config, use_karras_sigmas=True)
    return SAMPLER_CLASSES[sampler].from_config(base_config)


class SamplerFactory:
    """Hands out ready-to-step sampler instances (``set_timesteps`` already called)."""

    def __init__(self, base_config: Any, device: str = "cpu", max_templates: int = 64) -> None:
        self._device = device
        self._base_config = base_config
        self._templates: OrderedDict[tuple[Sampler, int, bool, float], DiffusersSampler] = OrderedDict()
        self._max = max_templates

    def create(
        self, sampler: Sampler, steps: int, karras: bool = False, strength: float = 1.0
    ) -> DiffusersSampler:
        """A sampler with its schedule for ``steps``; ``strength`` below 1 only for samplers
        whose schedule takes it (LCM's img2img schedule)."""
        key = (sampler, steps, karras, strength)
        tpl = self._templates.get(key)
        if tpl is None:
            tpl = make_sampler(self._base_config, sampler, karras)
            if strength != 1.0:
                tpl.set_timesteps(steps, device=self._device, strength=strength)
            else:
                tpl.set_timesteps(steps, device=self._device)
            self._templates[key] = tpl
            if len(self._templates) > self._max:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(key)
        return copy.deepcopy(tpl)
