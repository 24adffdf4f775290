"""How one unconditional removal's settings move its result: one zoo model, one method, the trigger the method's own
detector inverts (or `--detector`'s; one scan, never the true trigger), then the removal once per settings variant
(each a JSON object of config fields, `{}` = the defaults) on a fresh copy of the model. Attack success (true trigger) and SSIM to the
original model's samples (same noise) under every sampler of the model type (`--samplers families`: one ancestral
and one ODE sampler; VE: predictor-corrector and predictor).

    python scripts/probe_removal_settings.py --model uncond-ddpm-trojdiff-blend-inclass --method diff-cleanse \\
        --variants '{}' '{"steps": 0}' '{"distill_weight": 0}' --out benchmarks/results/pruning_probe_trojdiff.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from sealdiff.cli.remove_uncond import MEASURE_STEPS
from sealdiff.defenses import get_defense
from sealdiff.defenses.uncond import UNCOND_METHODS
from sealdiff.detection import DETECTORS, get_detector, load_for_scan
from sealdiff.detection import common as C
from sealdiff.io import to_jsonable, versions
from sealdiff.metrics import uncond as metrics

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--method", required=True, choices=list(UNCOND_METHODS))
parser.add_argument("--detector", choices=list(DETECTORS), default=None,
                    help="whose inverted trigger the removal gets (default: the method's own detector)")
parser.add_argument("--variants", nargs="+", type=json.loads, default=[{}], help="JSON objects of config fields")
parser.add_argument("--count", type=int, default=32)
parser.add_argument("--samplers", choices=("all", "families"), default="all")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--out", required=True)
args = parser.parse_args()
torch.set_num_threads(args.threads)

model, directory = load_for_scan(f"zoo:{args.model}")
backdoor = metrics.read_backdoor(directory)
defense, detector = UNCOND_METHODS[args.method]
detector = args.detector or detector
scan = get_detector(detector).make(progress=False).scan(model)
samplers = model.samplers if args.samplers == "all" else C.detection_samplers(model, None)
original = {s: metrics.generate(model, args.count, s, MEASURE_STEPS[s]) for s in samplers}
result = {"model": args.model, "method": args.method, "detector": detector, "count": args.count,
          "threads": args.threads, "versions": versions(), "scan": {"score": scan.score, "noise_scale": scan.noise_scale},
          "asr_before": {s: metrics.attack_success(model, backdoor, s, MEASURE_STEPS[s], args.count,
                                                   clean_images=original[s]).attack_success for s in samplers},
          "variants": []}
for variant in args.variants:
    repaired = copy.deepcopy(model)
    spec = get_defense(defense)
    start = time.perf_counter()
    spec.runner(spec.make_config(progress=False, **variant)).apply(repaired, scan.trigger, noise_scale=scan.noise_scale)
    row = {"settings": variant, "seconds": time.perf_counter() - start, "per_sampler": {}}
    for s in samplers:
        images = metrics.generate(repaired, args.count, s, MEASURE_STEPS[s])
        row["per_sampler"][s] = {
            "asr_after": metrics.attack_success(repaired, backdoor, s, MEASURE_STEPS[s], args.count,
                                                clean_images=images).attack_success,
            "ssim_to_original": metrics.agreement(images, original[s]).ssim}
    result["variants"].append(row)
    print(json.dumps(variant), {s: (round(v["asr_after"], 3), round(v["ssim_to_original"], 2))
                                for s, v in row["per_sampler"].items()}, flush=True)
    Path(args.out).write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
