"""Inversion methods, one module each, all with the same shape of API
(`InversionMethod`):

    code = method.invert(net, scheduler, x0, cond, uncond, *, num_steps, skip, cfg_scale, ..., generator=None)
    latents = method.edit(net, scheduler, code, cond, uncond, *, cfg_scale, ...)

`code` is a `NoiseCode`; what the methods share lives in `common` (and, for
rectified-flow models, `flow`). A method name (as in job specs) may have one
module per model family: "edit-friendly" is `edit_friendly` on SD/SDXL
(DDPM noise maps) and `flow_edit_friendly` on SD3/FLUX (the stochastic
flow sampler's maps).
"""

from importlib import import_module
from types import ModuleType
from typing import Any, Protocol

from .common import EpsModel, NoiseCode, Schedule

SD_FAMILIES = ("sd", "sdxl")
FLOW = "flow"
FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "flow": "flow models (SD3/FLUX)"}

# method name -> {family: module}
_MODULES: dict[str, dict[str, str]] = {
    "edit-friendly": {"sd": "edit_friendly", FLOW: "flow_edit_friendly"},
    "ddim": {"sd": "ddim"},
    "edict": {"sd": "edict"},
    "ddim-forward": {"sd": "ddim_forward"},
    "cycle": {"sd": "cycle"},
    "turbo-edit": {"sd": "turbo_edit"},
    "flowedit": {FLOW: "flowedit"},
}


class InversionMethod(Protocol):
    """What every method module provides."""

    METHOD: str  # its name in job specs and output rows
    DEFAULTS: dict  # its parameters (inversion.params) and their defaults
    SEED_INDEPENDENT: bool  # deterministic: N seeds would give N copies of one edit

    def invert(self, net: Any, scheduler: Any, x0: Any, cond: Any, uncond: Any, **kwargs: Any) -> NoiseCode: ...

    def edit(self, net: Any, scheduler: Any, code: NoiseCode, cond: Any, uncond: Any, **kwargs: Any) -> Any: ...


def register(name: str, module: str, family: str = "sd") -> None:
    _MODULES.setdefault(name, {})[family] = module


def method_names(family: str | None = None) -> list[str]:
    """Every method name, or those that run on a family ("sd", "sdxl", "flow")."""
    if family is None:
        return list(_MODULES)
    key = "sd" if family in SD_FAMILIES else family
    return [n for n, mods in _MODULES.items() if key in mods]


def method_families(name: str) -> list[str]:
    """The families a method runs on ("sd" standing for SD 1.x/2.x and SDXL)."""
    return list(_MODULES.get(name, {}))


def get_method(name: str, family: str | None = None) -> ModuleType:
    """The module of method `name` on `family` (None: its first family,
    for what does not depend on the model: parameter names and defaults).
    Raises ValueError for an unknown name or a method the family lacks."""
    mods = _MODULES.get(name)
    if mods is None:
        raise ValueError(f"unknown inversion method {name!r}: expected one of {', '.join(_MODULES)}")
    if family is None:
        return import_module(f"{__name__}.{next(iter(mods.values()))}")
    key = "sd" if family in SD_FAMILIES else family
    if key not in mods:
        raise ValueError(f"method {name!r} does not run on {FAMILY_NAMES.get(family, family)}; "
                         f"methods that do: {', '.join(method_names(family))}")
    return import_module(f"{__name__}.{mods[key]}")


__all__ = ["EpsModel", "InversionMethod", "NoiseCode", "Schedule", "get_method", "method_families", "method_names",
           "register"]
