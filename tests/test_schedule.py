import math

import pytest
import torch
from diffusers import DDIMScheduler

from pipeline.inversion.common import EpsModel, Schedule, ddim_mean, draw_noise, predict_x0, q_sample
from pipeline.models import sd_scheduler_config


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 50, 100, 7])
def test_schedule_matches_diffusers_timesteps(spacing, steps):
    sch = DDIMScheduler(**{**sd_scheduler_config(), "timestep_spacing": spacing})
    ours = Schedule.from_scheduler(sch, steps)
    sch.set_timesteps(steps)
    assert ours.timesteps.tolist() == sch.timesteps.tolist()


def test_schedule_does_not_mutate_scheduler():
    sch = DDIMScheduler(**sd_scheduler_config())
    sch.set_timesteps(13)
    Schedule.from_scheduler(sch, 100)
    assert len(sch.timesteps) == 13


def test_sd_schedule_facts():
    s = Schedule.from_scheduler(DDIMScheduler(**sd_scheduler_config()), 100)
    assert s.timesteps[0] == 991 and s.timesteps[-1] == 1 and s.timesteps[1] == 981
    # after the last step: final_alpha_cumprod = ab[0] because set_alpha_to_one is False
    assert float(s.ab_prev[-1]) == pytest.approx(float(s.alphas_cumprod[0]))


def test_ddpm_step_equals_diffusers_ddim_eta1():
    sch = DDIMScheduler(**sd_scheduler_config())
    s = Schedule.from_scheduler(sch, 50)
    sch.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for i in (0, 17, 49):
        t = int(s.timesteps[i])
        sigma = s.sigma(i, 1.0)
        ours = ddim_mean(x, eps, float(s.ab[i]), float(s.ab_prev[i]), sigma) + sigma * z
        ref = sch.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_closed_form_helpers_roundtrip():
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    xt = q_sample(x0, 0.3, n)
    torch.testing.assert_close(predict_x0(xt, n, 0.3), x0, atol=1e-5, rtol=1e-5)


def test_v_prediction_is_converted_to_epsilon():
    sch = DDIMScheduler(**{**sd_scheduler_config(), "prediction_type": "v_prediction"})
    s = Schedule.from_scheduler(sch, 10)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t = int(s.timesteps[3])
    ab = float(s.alphas_cumprod[t])
    xt = q_sample(x0, ab, eps)
    v = math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0

    model = EpsModel(lambda x, tt, e: v, s)
    torch.testing.assert_close(model(xt, t, torch.zeros(2, 1, 1)), eps, atol=1e-5, rtol=1e-5)


def test_draw_noise_explicit_shape_and_per_sample_generators():
    gens = [torch.Generator().manual_seed(k) for k in (5, 6)]
    both = draw_noise((3, 2, 4, 4), gens, batch_dim=1)
    one = draw_noise((3, 1, 4, 4), [torch.Generator().manual_seed(6)], batch_dim=1)
    torch.testing.assert_close(both[:, 1:2], one)
    assert both.is_contiguous()
    with pytest.raises(ValueError, match="generators"):
        draw_noise((3, 2, 4, 4), gens[:1], batch_dim=1)


def test_schedule_errors():
    sch = DDIMScheduler(**sd_scheduler_config())
    with pytest.raises(ValueError, match="num_steps"):
        Schedule.from_scheduler(sch, 0)
    with pytest.raises(ValueError, match="exceeds"):
        Schedule.from_scheduler(sch, 2000)
