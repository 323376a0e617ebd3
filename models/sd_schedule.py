"""Stable Diffusion 1.x's training noise schedule and timestep spacing (SD 2.x, SDXL and LCM
share it), for pipelines built in code: the test fixtures and bench/random_sd.py."""

from __future__ import annotations

SD_SCHEDULE: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}
