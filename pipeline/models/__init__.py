"""Model families and the registry that picks one for a model id.

One module per family, each with the same four entry points
(`load(model_id, device, dtype, revision)`, `model_limits`,
`missing_model_weights`, `BUILTIN` ids it builds offline):

- `sd`: Stable Diffusion 1.x/2.x and SDXL (UNet, epsilon/v-prediction, DDIM
  schedule); SDXL's micro-conditioning lives in `sdxl`;
- `flow`: rectified-flow transformers, SD3/SD3.5 and FLUX.1 (velocity
  prediction, FlowMatchEuler sigmas);
- `toy`: the trained toy model's architecture (an SD-family model whose
  weights ship in the package);
- `loading`: what loading shares (device/dtype rules, config files, the
  CLIP tokenizer, the offline switch, `ModelLimits`).

Adding a family is one module here and one line in `_FAMILIES`. A model id
is a built-in name or a diffusers-format folder / hub id, whose
model_index.json names its pipeline class (the flow family's classes are
`flow.PIPELINE_CLASSES`; anything else is read as SD).
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import flow, sd
from .loading import (DTYPES, ModelLimits, clip_tokenizer, default_device, default_dtype, hub_offline,
                      parse_dtype)
from .sd import (RANDOM_MODELS, SD15_RANDOM, SDXL_RANDOM, TINY, TINY_RESOLUTION, TINY_SDXL, TINY_SEED, Models,
                 build_random, build_sd15_random, build_tiny, build_tiny_sdxl, save_pipeline, sd_scheduler_config)
from .sdxl import ImageGeometry, image_geometry, time_ids_count
from .flow import TINY_FLUX, TINY_SD3, FlowModels

_FAMILIES: tuple[ModuleType, ...] = (sd, flow)


def builtin_ids() -> list[str]:
    """Every model id built or shipped offline (random-weight models and the toy model)."""
    return [name for fam in _FAMILIES for name in fam.BUILTIN]


def family_of(model_id: str, revision: str | None = None) -> ModuleType:
    """The family module that loads `model_id`: by built-in name, else by the
    pipeline class its model_index.json names (SD when it names none or
    cannot be read: SD's loader then says what is missing)."""
    for fam in _FAMILIES:
        if model_id in fam.BUILTIN:
            return fam
    from .loading import check_resolvable, model_index

    check_resolvable(model_id, builtin_ids())  # a mistyped or unreachable id fails in seconds, not after retries

    try:
        cls = str(model_index(model_id, revision).get("_class_name", ""))
    except ValueError:
        return sd  # (SD's loader then says what is missing)
    return flow if cls in flow.PIPELINE_CLASSES else sd


def load_models(model_id: str = TINY, *, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None, revision: str | None = None):
    """Load a model's components, by id (see each family's `load`):
    "tiny", "tiny-sdxl", "sd15-random", "sdxl-random", "toy", "tiny-sd3",
    "tiny-flux" offline, or a diffusers-format hub id / local folder of SD
    1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1. device/dtype default to CUDA with
    bf16/fp16 when available, else CPU fp32."""
    return family_of(model_id, revision).load(model_id, device=device, dtype=dtype, revision=revision)


def model_limits(model_id: str, revision: str | None = None) -> ModelLimits:
    """The limits of a model id from its configuration files only (no
    weights). Raises ValueError when the id does not resolve."""
    return family_of(model_id, revision).model_limits(model_id, revision)


def missing_model_weights(model_id: str, revision: str | None = None) -> str | None:
    """Why `load_models` would not find the model's weights (without loading them); None when at hand."""
    return family_of(model_id, revision).missing_model_weights(model_id, revision)


def model_family(model_id: str, revision: str | None = None) -> str:
    """"sd", "sdxl" or "flow" for a model id, from configs only (no weights)."""
    return model_limits(model_id, revision).family


__all__ = [
    "DTYPES", "RANDOM_MODELS", "SD15_RANDOM", "SDXL_RANDOM", "TINY", "TINY_FLUX", "TINY_RESOLUTION", "TINY_SD3",
    "TINY_SDXL", "TINY_SEED", "FlowModels", "ImageGeometry", "ModelLimits", "Models", "build_random",
    "build_sd15_random", "build_tiny", "build_tiny_sdxl", "builtin_ids", "clip_tokenizer", "default_device",
    "default_dtype", "family_of", "hub_offline", "image_geometry", "load_models", "missing_model_weights",
    "model_family", "model_limits", "parse_dtype", "save_pipeline", "sd_scheduler_config", "time_ids_count",
]
