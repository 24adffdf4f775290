"""DiffDefend purification settings side by side on zoo models: each model is scanned once with the DiffDefend
detector (its inverted trigger and noise scale, never the true trigger), then purified once per setting; attack
success with the true trigger, the false-trigger rate on the same clean noises, and SSIM to the original model's
samples, under both samplers of the model type. Results go to benchmarks/results/purification_probe.json.

    python scripts/probe_purification.py [--only uncond-ldm-villan-box-hat ...] [--settings '{"steps": 200}' ...]
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from sealdiff.cli.remove_uncond import MEASURE_STEPS
from sealdiff.defenses import get_defense
from sealdiff.detection import get_detector, load_for_scan
from sealdiff.detection import common as C
from sealdiff.io import to_jsonable, versions
from sealdiff.metrics import uncond as metrics

parser = argparse.ArgumentParser()
parser.add_argument("--only", nargs="*", default=["uncond-ldm-villan-box-hat", "uncond-ddpm-trojdiff-blend-inclass"])
parser.add_argument("--settings", nargs="*", default=['{"steps": 200}', '{"steps": 400}'],
                    help="PurificationConfig overrides, one JSON object per setting")
parser.add_argument("--count", type=int, default=32)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--out", default="benchmarks/results/purification_probe.json")
args = parser.parse_args()
torch.set_num_threads(args.threads)
settings = [json.loads(s) for s in args.settings]
spec = get_defense("diffdefend-purify")


def measure(model, backdoor, sampler: str, original: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    images = metrics.generate(model, args.count, sampler, MEASURE_STEPS[sampler])
    hit = metrics.attack_success(model, backdoor, sampler, MEASURE_STEPS[sampler], args.count, clean_images=images)
    row = {"attack_success": hit.attack_success, "false_trigger_rate": hit.false_trigger_rate}
    if original is not None:
        row["ssim_to_original"] = metrics.agreement(images, original).ssim
    return row, images


results = {}
for name in args.only:
    model, directory = load_for_scan(f"zoo:{name}")
    backdoor = metrics.read_backdoor(directory)
    scan = get_detector("diffdefend").make(progress=False).scan(model)
    samplers = C.detection_samplers(model, None)  # both sampler families of the model type
    before, original = {}, {}
    for s in samplers:
        before[s], original[s] = measure(model, backdoor, s)
    rows = []
    for setting in settings:
        repaired = copy.deepcopy(model)
        spec.runner(spec.make_config(progress=False, **setting)).apply(repaired, scan.trigger.float(),
                                                                       noise_scale=scan.noise_scale)
        rows.append({"setting": setting, **{s: measure(repaired, backdoor, s, original[s])[0] for s in samplers}})
        print(name, json.dumps(to_jsonable(rows[-1])), flush=True)
    results[name] = {"noise_scale": scan.noise_scale, "before": before, "after": rows}

Path(args.out).write_text(json.dumps(to_jsonable({"config": vars(args), "versions": versions(),
                                                  "results": results}), indent=2))
print("wrote", args.out)
