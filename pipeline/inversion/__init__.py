"""Inversion methods, one module each, all with the same shape of API:

    code = method.invert(unet, scheduler, x0, cond, uncond, *, num_steps, skip, cfg_scale, ..., generator=None)
    latents = method.edit(unet, scheduler, code, cond, uncond, *, cfg_scale, ...)

`code` is a `NoiseCode`; what the methods share lives in `common`.
"""

from importlib import import_module
from types import ModuleType

from .common import EpsModel, NoiseCode, Schedule

# method name (as in job specs) -> module
_MODULES = {
    "edit-friendly": "edit_friendly",
    "ddim": "ddim",
    "edict": "edict",
    "ddim-forward": "ddim_forward",
    "cycle": "cycle",
    "turbo-edit": "turbo_edit",
}


def register(name: str, module: str) -> None:
    _MODULES[name] = module


def method_names() -> list[str]:
    return list(_MODULES)


def get_method(name: str) -> ModuleType:
    try:
        return import_module(f"{__name__}.{_MODULES[name]}")
    except KeyError:
        raise ValueError(f"unknown inversion method {name!r}: expected one of {', '.join(_MODULES)}") from None


__all__ = ["EpsModel", "NoiseCode", "Schedule", "get_method", "method_names", "register"]
