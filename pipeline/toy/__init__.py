"""A small text-to-image diffusion model trained on synthetic shapes, shipped
with imprint so the method can be seen working without a GPU or a download.

- `scenes`: the toy world (one coloured shape on a plain background) and its
  exact masks, for oracles.
- `model`: the architecture (SD-shaped: UNet2DConditionModel, CLIP text
  encoder, CLIP tokenizer, SD's DDIM scheduler) and the exact invertible
  pixel-unshuffle map that stands in for the VAE.
- `train`: the recipe that made the shipped weights (`make toy-model`).
- `oracle`: what a scene's pixels say (colour of a region, segmentation).
"""
