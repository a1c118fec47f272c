"""Shared test models: the paper's 2-D illustration (Sec. 5, Fig. 5), data
N(m, I) with the exact closed-form denoiser."""

import math

import torch
from diffusers import DDIMScheduler


class GaussianDenoiser:
    """eps(x_t) = sqrt(1 - ab) (x_t - sqrt(ab) m): the exact denoiser for
    data N(m, I), whatever the text embedding."""

    def __init__(self, alphas_cumprod, mean):
        self.ac = alphas_cumprod.double()
        self.mean = mean

    def __call__(self, x, t, emb):
        ab = float(self.ac[int(t)])
        return math.sqrt(1 - ab) * (x - math.sqrt(ab) * self.mean)


def gaussian_2d(mean=(10.0, 10.0)):
    """(scheduler, denoiser, mean [1, 2, 1, 1], embedding) of the 2-D example:
    linear betas, 1000 training steps, samples shaped [B, 2, 1, 1]."""
    sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=False, steps_offset=1)
    m = torch.tensor(mean).view(1, 2, 1, 1)
    return sch, GaussianDenoiser(sch.alphas_cumprod, m), m, torch.zeros(1, 1, 1)
