"""The sampler vocabulary: short names a config may use -> diffusers scheduler class, extra config, A1111 name.

One table for validation (config), building schedulers (models) and reading A1111 infotext (reproduce).
"""

from __future__ import annotations

# short name -> (diffusers class, extra config, A1111 sampler name)
SCHEDULER_TABLE: dict[str, tuple[str, dict, str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
}
SCHEDULERS = tuple(SCHEDULER_TABLE)
