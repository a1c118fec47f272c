"""A small text-to-image diffusion model trained on synthetic shapes, shipped
with imprint so the method can be seen working without a GPU or a download.

- `scenes`: the toy world (one coloured shape on a plain background) and its
  exact masks, for oracles.
- the architecture (`pipeline.models.toy`, with the other model families) (SD-shaped: a small AutoencoderKL trained on the
  scenes, UNet2DConditionModel, CLIP text encoder, CLIP tokenizer, SD's DDIM
  scheduler).
- `train`: the recipe that made the shipped weights (`make toy-model`).
- `oracle`: what a scene's pixels say (colour of a region, segmentation).
"""
