"""`imprint bench`: the result document, the counted UNet work against the
closed forms of both call patterns, the FLOP counter, the SD-1.5-shaped
builder and the CLI. No timing assertions: the machine is shared."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from pipeline.models import build_sd15_random

from pipeline.bench import (
    BenchConfig,
    bf16_peak_tflops,
    evals_ours,
    evals_turbo,
    evals_reference,
    format_table,
    physical_limit_edits_per_s,
    run_bench,
    unet_flops_per_eval,
)
from pipeline.cli import app

# steps 6, skip 3: ours and the reference do different amounts of work, so
# each closed form is checked against its own path (skip 2 would give 56 and 56).
FAST = dict(model="tiny", steps=6, skip=3, prompts=2, seeds=2, images=1, batch=4, warmup=False, threads=1)

PATH_FIELDS = {
    "seconds", "seconds_all", "cpu_seconds", "cpu_seconds_all", "edits_per_cpu_s", "edits", "images", "edits_per_s", "images_per_s", "unet_calls", "unet_image_evals",
    "unet_image_evals_per_edit", "unet_image_evals_closed_form", "unet_rows_per_call", "stages_s", "unet_tflop",
    "tflops", "tflops_unet_stages", "bf16_peak_fraction", "peak_memory_bytes", "peak_memory_kind", "nonfinite_edits",
    "unet_busy_s", "unet_busy_fraction", "edits_per_s_physical_limit",
}


@pytest.fixture(scope="module")
def result():
    before = torch.get_num_threads()
    out = run_bench(BenchConfig(**FAST), log=lambda m: None)
    assert torch.get_num_threads() == before  # the bench restores the thread setting
    return out


def test_result_has_every_field(result):
    assert set(result) >= {"bench_version", "params", "env", "model", "unet_flops_per_image_eval", "paths", "speedup", "checks"}
    for k in ("model", "steps", "skip", "prompts", "seeds", "images", "batch", "dtype", "compile", "channels_last",
              "sdpa", "reference", "repeats", "cfg_source", "cfg_target", "dtype_ours", "dtype_reference"):
        assert k in result["params"], k
    for k in ("device", "device_name", "torch", "diffusers", "torch_threads", "loadavg_start", "loadavg_end"):
        assert k in result["env"], k
    assert result["env"]["torch_threads"] == 1
    for name in ("ours", "reference"):
        path = result["paths"][name]
        assert set(path) >= PATH_FIELDS, PATH_FIELDS - set(path)
        assert path["edits"] == FAST["prompts"] * FAST["seeds"] * FAST["images"]
        assert path["seconds"] > 0 and path["edits_per_s"] == pytest.approx(path["edits"] / path["seconds"])
        assert path["peak_memory_bytes"] > 0
        for stage in ("decode", "vae_encode", "invert", "edit", "vae_decode", "write"):
            assert path["stages_s"][stage] >= 0, stage
        assert path["bf16_peak_fraction"] is None  # CPU: no bf16 peak to compare with
        assert path["nonfinite_edits"] == 0
    assert "score" not in result["paths"]["ours"]["stages_s"]  # scoring off
    ours, ref = result["paths"]["ours"], result["paths"]["reference"]
    assert result["speedup"] == pytest.approx(ours["edits_per_s"] / ref["edits_per_s"])
    assert result["speedup_per_repeat"] == [pytest.approx(result["speedup"])]  # one repeat
    assert result["speedup_cpu_time"] == pytest.approx(ours["edits_per_cpu_s"] / ref["edits_per_cpu_s"])
    # the share of the engine's wall time spent inside UNet calls, and no host sync inside the step loops
    assert 0 < ours["unet_busy_fraction"] <= 1 and ours["unet_busy_s"] > 0
    assert ref["unet_busy_fraction"] is None and ours["edits_per_s_physical_limit"] is None  # CPU: no peak
    syncs = result["host_syncs_per_step"]
    assert syncs["how"] == "dispatch_counter" and syncs["invert"] == syncs["edit"] == 0, syncs
    # the figure: 989 TFLOP/s, 803.3 GFLOP per evaluation, 168 evaluations per edit
    assert physical_limit_edits_per_s(989.0, 803.3e9, 168) == pytest.approx(7.33, abs=0.01)
    json.dumps(result)  # serialisable as written by the CLI
    table = format_table(result)
    assert "speed-up" in table and "edits/s" in table and "invert" in table


def test_counted_unet_work_matches_closed_forms(result):
    s, k, n = FAST["steps"] - FAST["skip"], FAST["prompts"], FAST["seeds"]
    ours, ref = result["paths"]["ours"], result["paths"]["reference"]
    # ours: inversion of the s steps an edit uses on 2N rows, then s edit steps
    # on 2 (K N + 1 reconstruction) rows, per edit
    assert evals_ours(6, 3, k, n) == s * 2 * n + s * 2 * (k * n + 1) == 42
    assert ours["unet_image_evals"] == 42
    assert ours["unet_image_evals_per_edit"] == pytest.approx(42 / (k * n))
    # chunked by the max batch of 4: inversion 4 rows = 1 call, edit 10 rows = 3 calls, per step
    assert ours["unet_calls"] == s * (1 + math.ceil(2 * (k * n + 1) / FAST["batch"]))
    # reference: N full inversions of all 6 steps, K N edits, each evaluation its own batch-1 call
    assert evals_reference(6, 3, k, n) == n * 2 * 6 + k * n * 2 * s == 48
    assert ref["unet_image_evals"] == ref["unet_calls"] == 48
    assert ref["unet_image_evals_per_edit"] == pytest.approx(48 / (k * n))
    assert ours["unet_image_evals_closed_form"] == 42 and ref["unet_image_evals_closed_form"] == 48
    assert result["checks"]["counts_match_closed_form"] is True
    # the paper's defaults, as quoted in the report: 168 vs 178 evaluations per edit
    assert evals_ours(100, 36, 4, 4) / 16 == 168 and evals_reference(100, 36, 4, 4) / 16 == 178


def test_same_math_different_call_pattern(result):
    # same noise draws and closed-form helpers: the edits agree up to float
    # rounding, and ours reconstructs its source latent
    assert result["checks"]["edits_max_abs_diff_vs_reference"] < 1e-3
    assert result["checks"]["recon_error_max"] < 1e-4


def test_flop_count_scales_with_pixels(tiny):
    params = sum(p.numel() for p in tiny.unet.parameters())
    before = {k: v.clone() for k, v in list(tiny.unet.state_dict().items())[:3]}
    f64 = unet_flops_per_eval(tiny.unet, (8, 8))  # 64 px images
    f128 = unet_flops_per_eval(tiny.unet, (16, 16))  # 128 px images
    assert f64 > 2 * params  # every conv weight is used at many positions
    assert 3.5 < f128 / f64 < 4.5  # convolutions scale with pixels; attention a bit faster
    for k, v in before.items():  # counted on a meta copy: the model is untouched
        assert torch.equal(tiny.unet.state_dict()[k], v)


def test_sd15_random_has_sd15_shapes():
    m = build_sd15_random("meta")  # shapes only: nothing allocated
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(m.unet) == 859_520_964  # SD-1.5's published component sizes
    assert count(m.vae) == 83_653_863
    assert count(m.text_encoder) == 123_060_480
    assert m.resolution == 512 and m.vae_scale_factor == 8
    flops = unet_flops_per_eval(m.unet, (64, 64))
    assert 0.7e12 < flops < 0.9e12  # about 0.8 TFLOP per image-evaluation at 512 px


def test_bf16_peaks_by_device_name():
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756
    assert bf16_peak_tflops("NVIDIA H200") == 989
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bf16_peak_tflops("NVIDIA L40S") == 362
    assert bf16_peak_tflops("NVIDIA L4") == 121
    assert bf16_peak_tflops("Tesla T4") is None


def test_bad_config_named():
    with pytest.raises(ValueError, match="skip"):
        BenchConfig(steps=10, skip=10).validate()
    with pytest.raises(ValueError, match="seeds"):
        BenchConfig(seeds=0).validate()


def test_cli_writes_json(tmp_path):
    out = tmp_path / "b" / "bench.json"
    args = ["bench", "--steps", "3", "--skip", "1", "--prompts", "1", "--seeds", "2", "--batch", "8",
            "--no-warmup", "--no-recon", "--threads", "1", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["params"]["steps"] == 3 and doc["params"]["seeds"] == 2
    assert doc["paths"]["ours"]["unet_image_evals"] == evals_ours(3, 1, 1, 2, recon=False) == 2 * 2 * 2 + 2 * 2 * 2
    assert doc["checks"]["recon_error_max"] is None  # no reconstruction row
    assert doc["paths"]["reference"]["unet_image_evals"] == evals_reference(3, 1, 1, 2)
    assert doc["speedup"] > 0
    assert "speed-up" in r.output

    r = CliRunner().invoke(app, ["bench", "--steps", "3", "--skip", "3", "--out", str(out)])
    assert r.exit_code == 2 and "skip" in r.output


def test_ours_models_leave_the_reference_fp32(tiny):
    from pipeline.bench import _ours_models

    ours = _ours_models(tiny, torch.bfloat16, channels_last=True, compile_unet=False)
    assert ours.dtype == torch.bfloat16 and ours.unet.dtype == torch.bfloat16 and ours.vae.dtype == torch.bfloat16
    assert ours.unet is not tiny.unet
    conv = ours.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert tiny.unet.dtype == torch.float32 and tiny.unet.conv_in.weight.is_contiguous()  # untouched
    assert _ours_models(tiny, torch.float32, channels_last=False, compile_unet=False) is tiny  # nothing to change: shared


# ---------------------------------------------------------------------------
# turbo-edit against 100-step edit-friendly (issue 23)
# ---------------------------------------------------------------------------

# one bench run on tiny-sdxl (the SDXL adapter's random model), as the issue asks
TURBO = dict(model="tiny-sdxl", steps=100, skip=36, prompts=2, seeds=2, images=1, method="turbo-edit", turbo_steps=4,
             threads=1)


@pytest.fixture(scope="module")
def turbo_result():
    return run_bench(BenchConfig(**TURBO), log=lambda m: None)


def test_turbo_edit_is_at_least_8x_faster_per_edit_than_100_step_edit_friendly(turbo_result):
    r = turbo_result
    turbo, ef = r["paths"]["turbo-edit"], r["paths"]["edit-friendly"]
    k, n = TURBO["prompts"], TURBO["seeds"]
    assert turbo["edits"] == ef["edits"] == k * n
    # counted work equals the closed forms: turbo-edit 4 x N inversion rows in one call, then per step
    # the source prompt on K N + 1 rows and the target on K N rows; edit-friendly 64 guided steps each way
    assert evals_turbo(4, k, n) == 4 * n + 4 * (2 * k * n + 1) == 44
    assert turbo["unet_image_evals"] == 44 and turbo["unet_calls"] == 1 + 4
    assert ef["unet_image_evals"] == evals_ours(100, 36, k, n) == 64 * 2 * n + 64 * 2 * (k * n + 1)
    assert r["checks"]["counts_match_closed_form"] is True
    assert r["evals_per_edit_ratio"] == pytest.approx(ef["unet_image_evals"] / 44)
    # both reconstruct their source latents (turbo-edit's reconstruction rows are unclipped)
    assert all(v < 1e-3 for v in r["checks"]["recon_error_max"].values())
    # the target, measured in one run on the same model: at least 8x the edits/s
    assert r["speedup"] >= 8.0, r["speedup"]
    assert r["speedup"] == pytest.approx(turbo["edits_per_s"] / ef["edits_per_s"])
    table = format_table(r)
    assert "turbo-edit / edit-friendly" in table and "UNet image-evals per edit" in table


def test_bench_method_is_checked():
    with pytest.raises(ValueError, match="method"):
        BenchConfig(method="nope").validate()


def test_sdxl_random_has_sdxl_shapes():
    from pipeline.models import SDXL_RANDOM, build_random, model_limits

    m = build_random(SDXL_RANDOM, "meta")  # shapes only: nothing allocated
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(m.unet) == 2_567_463_684  # SDXL base's published component sizes
    assert count(m.text_encoder) == 123_060_480 and count(m.text_encoder_2) == 694_659_840
    assert count(m.vae) == 83_653_863
    assert m.n_time_ids == 6 and m.force_zeros_uncond and m.resolution == 512
    lim = model_limits(SDXL_RANDOM)  # from the config alone, as validate sees it
    assert (lim.resolution, lim.latent_multiple, lim.text_context) == (512, 32, 77)


def test_sdxl_reference_call_pattern_agrees_with_the_engine():
    # the reference loop conditions like the engine (zero unconditional row,
    # the image's time ids): same edits up to float rounding
    out = run_bench(BenchConfig(**{**FAST, "model": "tiny-sdxl", "prompts": 1, "seeds": 1}), log=lambda m: None)
    assert out["checks"]["edits_max_abs_diff_vs_reference"] < 1e-3
