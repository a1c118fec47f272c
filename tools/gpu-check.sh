#!/usr/bin/env bash
# One GPU check of the engine, under 8 minutes on one H100/H200:
#   1. `imprint bench` with the SD-1.5-shaped random model (sd15-random) at 512x512, bf16,
#      K = 4 prompts, N = 4 seeds, 8 images, SDPA attention: eager, then torch.compile + channels_last;
#      each reports edits/s, the fraction of the dense bf16 peak next to the physical limit
#      (edits/s if every UNet FLOP ran at peak), the share of the engine's wall time the UNet is busy
#      (CUDA events around every UNet call), peak memory (torch.cuda.max_memory_allocated) and the
#      host syncs per denoising step (torch.cuda.set_sync_debug_mode around the step loops);
#   2. the demo job (jobs/demo.toml, inline) and `imprint edit-codes` on its stored codes, on CUDA;
#   3. SDXL-shaped, random weights at real size (model $SDXL_MODEL, default sdxl-random: a random-weight
#      SDXL-base-shaped model id the adapter is to provide, like sd15-random), 512x512, bf16:
#      `imprint bench --method turbo-edit` (turbo-edit, 4 steps, against 100-step edit-friendly, skip 36,
#      on the same model in one run), eager, then torch.compile; each reports edits/s of both methods,
#      UNet image-evaluations per edit and the ratio. A failure here is reported in the summary and
#      makes the exit status non-zero, after the steps above have written their results;
#   4. flow-shaped, random weights at real size (model $FLOW_MODEL, default sd3-random: SD3.5 medium's
#      architecture at 1024x1024, 2.2 B transformer parameters, no T5), bf16, eager:
#      `imprint bench --method flow` (FlowEdit against edit-friendly, both 28 steps, skip 4, FlowEdit's
#      SD3 guidance 3.5 / 13.5, K = 2 prompts, N = 2 seeds, 1 image); reports edits/s of both, transformer
#      evaluations and FLOPs per edit. A failure is reported like step 3's;
#   5. a summary (summary.json) with the targets: UNet busy >= 90% of the engine's wall time,
#      no host sync inside the step loop, peak memory <= 40 GiB.
#
# Usage: tools/gpu-check.sh [--cpu-smoke] [OUT_DIR]
#   --cpu-smoke  the same steps on the CPU with the tiny model and minimal sizes (seconds), so the
#                script is exercised in CI (tests/test_gpu_check.py) and cannot rot (step 3 on
#                tiny-sdxl, step 4 on tiny-flux; set SDXL_MODEL / FLOW_MODEL to override).
# OUT_DIR defaults to $OUT (the device machine's output folder) or out/gpu-check.
# Exit status: non-zero when a step fails; missed targets are reported, not fatal.
set -euo pipefail

mode=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then mode=cpu; shift; fi
out_dir="${1:-${OUT:-out/gpu-check}}"
py="${PYTHON:-python}"
imprint=("$py" -m pipeline.cli)
cd "$(dirname "$0")/.."
mkdir -p "$out_dir"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

if [[ $mode == gpu ]]; then
  device=cuda
  bench_common=(--model sd15-random --device cuda --dtype bf16 --prompts 4 --seeds 4 --images 8
                --batch 64 --decode-batch 8 --no-reference --repeats 1)
  run_sets=()
  flow_bench=(--model "${FLOW_MODEL:-sd3-random}" --device cuda --dtype bf16 --method flow --steps 28 --skip 4
              --prompts 2 --seeds 2 --images 1 --batch 64 --decode-batch 8 --repeats 1)
  sdxl_bench=(--model "${SDXL_MODEL:-sdxl-random}" --device cuda --dtype bf16 --method turbo-edit --turbo-steps 4
              --steps 100 --skip 36 --prompts 4 --seeds 4 --images 2 --batch 64 --decode-batch 8 --repeats 1)
  "$py" - <<'PY' || { echo "gpu-check: no CUDA device" >&2; exit 2; }
import torch
assert torch.cuda.is_available()
print("gpu-check:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out_dir/nvidia-smi.csv"
else
  device=cpu
  bench_common=(--model tiny --device cpu --dtype fp32 --steps 2 --skip 0 --prompts 1 --seeds 1 --images 1
                --batch 64 --decode-batch 8 --no-reference --no-warmup --threads 1)
  run_sets=(--set inversion.steps=2 --set inversion.skip=0 --set edit.seeds=1 --set score.enabled=false
            --set run.threads=1)
  flow_bench=(--model "${FLOW_MODEL:-tiny-flux}" --device cpu --dtype fp32 --method flow --steps 3 --skip 1
              --prompts 1 --seeds 2 --images 1 --batch 64 --decode-batch 8 --no-warmup --threads 1)
  sdxl_bench=(--model "${SDXL_MODEL:-tiny-sdxl}" --device cpu --dtype fp32 --method turbo-edit --turbo-steps 2
              --steps 3 --skip 1 --prompts 1 --seeds 1 --images 1 --batch 64 --decode-batch 8 --no-warmup --threads 1)
fi

step() { echo "gpu-check: [$(date -u +%H:%M:%S)] $*" >&2; }
# timed NAME CMD...: run CMD, keep its last lines, write its wall seconds to OUT_DIR/NAME.time
timed() {
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@" > "$out_dir/$name.log" 2>&1 || { tail -n 20 "$out_dir/$name.log" >&2; echo "gpu-check: $name failed" >&2; exit 1; }
  tail -n 3 "$out_dir/$name.log"
  echo "$t0 $(date +%s.%N)" | awk '{print $2 - $1}' > "$out_dir/$name.time"
}

step "bench, eager (SDPA)"
"${imprint[@]}" bench "${bench_common[@]}" --sdpa --out "$out_dir/bench-eager.json" | tee "$out_dir/bench-eager.txt"

step "bench, torch.compile + channels_last (SDPA)"
if [[ $mode == gpu ]]; then
  "${imprint[@]}" bench "${bench_common[@]}" --sdpa --compile --channels-last --out "$out_dir/bench-compile.json" \
    | tee "$out_dir/bench-compile.txt"
else  # compiling needs a C compiler and minutes on a CPU: the smoke run checks the channels_last path only
  "${imprint[@]}" bench "${bench_common[@]}" --sdpa --channels-last --out "$out_dir/bench-compile.json" \
    | tee "$out_dir/bench-compile.txt"
fi

step "demo job on $device"
rm -rf "$out_dir/demo" "$out_dir/demo-codes"
timed demo "${imprint[@]}" run jobs/demo.toml --executor inline --no-progress \
  --set "model.device=\"$device\"" --set "output.path=\"$out_dir/demo\"" "${run_sets[@]}"

step "edit-codes on $device"
timed edit-codes "${imprint[@]}" edit-codes "$out_dir/demo" jobs/demo.toml --executor inline \
  --no-progress --set "model.device=\"$device\"" --set "output.path=\"$out_dir/demo-codes\"" \
  --set 'input.templates=["{source}, watercolor"]' "${run_sets[@]}"

# SDXL-shaped turbo-edit runs: a failure is recorded (sdxl-NAME.failed) and reported, not fatal until the end
sdxl_failed=0
for variant in eager compile; do
  step "SDXL-shaped bench, turbo-edit vs edit-friendly, $variant"
  extra=()
  [[ $variant == compile && $mode == gpu ]] && extra=(--compile)  # compiling on a CPU needs a C compiler and minutes
  rm -f "$out_dir/sdxl-$variant.failed"
  if ! "${imprint[@]}" bench "${sdxl_bench[@]}" "${extra[@]}" --out "$out_dir/bench-sdxl-$variant.json" \
      > "$out_dir/bench-sdxl-$variant.txt" 2>&1; then
    tail -n 20 "$out_dir/bench-sdxl-$variant.txt" >&2
    echo "gpu-check: SDXL-shaped bench ($variant) failed" | tee "$out_dir/sdxl-$variant.failed" >&2
    sdxl_failed=1
  else
    tail -n 6 "$out_dir/bench-sdxl-$variant.txt"
  fi
done

step "flow-shaped bench, flowedit vs edit-friendly"
flow_failed=0
rm -f "$out_dir/flow.failed"
if ! "${imprint[@]}" bench "${flow_bench[@]}" --out "$out_dir/bench-flow.json" > "$out_dir/bench-flow.txt" 2>&1; then
  tail -n 20 "$out_dir/bench-flow.txt" >&2
  echo "gpu-check: flow-shaped bench failed" | tee "$out_dir/flow.failed" >&2
  flow_failed=1
else
  tail -n 8 "$out_dir/bench-flow.txt"
fi

step "summary"
"$py" - "$out_dir" "$mode" <<'PY'
import json, pathlib, sys

out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
summary = {"mode": mode, "runs": {}, "sdxl_turbo": {}, "flow": {}}
for name in ("eager", "compile"):
    r = json.loads((out / f"bench-{name}.json").read_text())
    o = r["paths"]["ours"]
    hs = r["host_syncs_per_step"]
    summary["runs"][name] = row = {
        "device_name": r["env"]["device_name"], "compile": r["params"]["compile"],
        "channels_last": r["params"]["channels_last"], "sdpa": r["params"]["sdpa"], "dtype": r["params"]["dtype_ours"],
        "edits_per_s": o["edits_per_s"], "edits_per_s_physical_limit": o["edits_per_s_physical_limit"],
        "bf16_peak_fraction": o["bf16_peak_fraction"], "tflops": o["tflops"],
        "unet_busy_fraction": o["unet_busy_fraction"], "peak_memory_gib": o["peak_memory_bytes"] / 2**30,
        "peak_memory_kind": o["peak_memory_kind"], "host_syncs_per_step": {"invert": hs["invert"], "edit": hs["edit"], "how": hs["how"]},
        "unet_rows_per_call": o["unet_rows_per_call"], "stages_s": o["stages_s"], "nonfinite_edits": o["nonfinite_edits"],
    }
    row["targets"] = {
        "unet_busy_ge_0.9": o["unet_busy_fraction"] is not None and o["unet_busy_fraction"] >= 0.9,
        "no_host_sync_in_step_loop": hs["invert"] == 0 and hs["edit"] == 0,
        "peak_memory_le_40GiB": o["peak_memory_kind"] == "cuda_max_memory_allocated" and o["peak_memory_bytes"] <= 40 * 2**30,
    }
    lim = o["edits_per_s_physical_limit"]
    frac = o["bf16_peak_fraction"]
    print(f"gpu-check {name:8s}: {o['edits_per_s']:.3g} edits/s"
          + (f" = {frac:.1%} of bf16 peak; physical limit {lim:.2f} edits/s at {o['unet_image_evals_per_edit']:.0f} UNet evals/edit"
             if lim else " (no bf16 peak known for this device)")
          + f"; UNet busy {o['unet_busy_fraction']:.1%} of engine wall time; peak memory {row['peak_memory_gib']:.2f} GiB "
          f"({o['peak_memory_kind']}); host syncs/step invert {hs['invert']:.2f} edit {hs['edit']:.2f} ({hs['how']})")
for job in ("demo", "edit-codes"):
    wall = float((out / f"{job}.time").read_text())
    summary[job] = {"wall_s": wall, "last_lines": (out / f"{job}.log").read_text().splitlines()[-3:]}
    print(f"gpu-check {job}: {wall:.1f} s wall (process start to exit)")
for name in ("eager", "compile"):
    if (out / f"sdxl-{name}.failed").exists():
        summary["sdxl_turbo"][name] = {"failed": True, "log": f"bench-sdxl-{name}.txt"}
        print(f"gpu-check sdxl {name}: FAILED (see bench-sdxl-{name}.txt)")
        continue
    r = json.loads((out / f"bench-sdxl-{name}.json").read_text())
    t, e = r["paths"]["turbo-edit"], r["paths"]["edit-friendly"]
    summary["sdxl_turbo"][name] = {
        "model": r["model"]["id"], "resolution": r["model"]["resolution"], "dtype": r["params"]["dtype_ours"],
        "compile": r["params"]["compile"], "device_name": r["env"]["device_name"],
        "turbo_edit_edits_per_s": t["edits_per_s"], "edit_friendly_edits_per_s": e["edits_per_s"],
        "speedup_per_edit": r["speedup"], "evals_per_edit": {"turbo-edit": t["unet_image_evals_per_edit"],
                                                             "edit-friendly": e["unet_image_evals_per_edit"]},
        "turbo_edit_bf16_peak_fraction": t["bf16_peak_fraction"], "turbo_edit_peak_memory_gib": t["peak_memory_bytes"] / 2**30,
        "recon_error_max": r["checks"]["recon_error_max"], "nonfinite_edits": t["nonfinite_edits"] + e["nonfinite_edits"],
    }
    print(f"gpu-check sdxl {name}: turbo-edit {t['edits_per_s']:.3g} edits/s ({t['unet_image_evals_per_edit']:.1f} UNet evals/edit), "
          f"edit-friendly {e['edits_per_s']:.3g} edits/s ({e['unet_image_evals_per_edit']:.1f}): {r['speedup']:.1f}x per edit")
if (out / "flow.failed").exists():
    summary["flow"] = {"failed": True, "log": "bench-flow.txt"}
    print("gpu-check flow: FAILED (see bench-flow.txt)")
else:
    r = json.loads((out / "bench-flow.json").read_text())
    summary["flow"] = {
        "model": r["model"]["id"], "resolution": r["model"]["resolution"], "dtype": r["params"]["dtype_ours"],
        "device_name": r["env"]["device_name"], "transformer_flops_per_eval": r["unet_flops_per_image_eval"],
        "recon_error_max": r["checks"]["recon_error_max"], "counts_match_closed_form": r["checks"]["counts_match_closed_form"],
        **{name: {"edits_per_s": p["edits_per_s"], "evals_per_edit": p["unet_image_evals_per_edit"],
                  "flops_per_edit": p.get("flops_per_edit"), "bf16_peak_fraction": p["bf16_peak_fraction"],
                  "peak_memory_gib": p["peak_memory_bytes"] / 2**30, "nonfinite_edits": p["nonfinite_edits"]}
           for name, p in r["paths"].items()},
    }
    f, e = r["paths"]["flowedit"], r["paths"]["edit-friendly"]
    print(f"gpu-check flow: flowedit {f['edits_per_s']:.3g} edits/s ({f['unet_image_evals_per_edit']:.1f} transformer evals/edit), "
          f"edit-friendly {e['edits_per_s']:.3g} edits/s ({e['unet_image_evals_per_edit']:.1f})")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(f"gpu-check: wrote {out / 'summary.json'}")
PY
if [[ $sdxl_failed == 1 ]]; then echo "gpu-check: an SDXL-shaped run failed" >&2; exit 1; fi
if [[ $flow_failed == 1 ]]; then echo "gpu-check: the flow-shaped run failed" >&2; exit 1; fi
