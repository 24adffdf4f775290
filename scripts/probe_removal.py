"""Where the unconditional removals' clean drift and leftover attack success come from: one removal method on one
zoo model, run with the trigger its detector inverted, with τ = 0 (the fine-tuning alone), with the true trigger and
with the true trigger's channel means removed (as the ratio search's candidates are) — the last two are diagnostics
only; sealdiff's removals never see the true trigger. Attack success and closeness to the original model's samples
(same noise) after each, under every sampler of the model type; results go to benchmarks/results/removal_probe.json.

    python scripts/probe_removal.py [--model uncond-ddpm-baddiffusion-box-hat] [--methods elijah diffdefend]
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from sealdiff.cli.remove_uncond import MEASURE_STEPS, attack_sampler
from sealdiff.defenses import get_defense
from sealdiff.defenses.uncond import UNCOND_METHODS
from sealdiff.detection import get_detector, load_for_scan
from sealdiff.detection import common as C
from sealdiff.io import to_jsonable, versions
from sealdiff.metrics import uncond as metrics

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="uncond-ddpm-baddiffusion-box-hat")
parser.add_argument("--methods", nargs="*", default=["elijah", "diffdefend"], choices=list(UNCOND_METHODS))
parser.add_argument("--count", type=int, default=32)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--out", default="benchmarks/results/removal_probe.json")
args = parser.parse_args()
torch.set_num_threads(args.threads)

model, directory = load_for_scan(f"zoo:{args.model}")
backdoor = metrics.read_backdoor(directory)
record = json.loads((directory / "sealdiff.json").read_text())
sampler = attack_sampler(model.kind, record.get("attack"), record.get("config"))
samplers = C.detection_samplers(model, None)  # both sampler families of the model type
original = {s: metrics.generate(model, args.count, s, MEASURE_STEPS[s]) for s in samplers}
true = backdoor.trigger.float()
true_zero_mean = true - true.mean(dim=(-2, -1), keepdim=True)
rows = {}
for method in args.methods:
    defense, detector = UNCOND_METHODS[method]
    scan = get_detector(detector).make(progress=False).scan(model)
    spec = get_defense(defense)
    for label, trigger, gamma in (("inverted", scan.trigger, scan.noise_scale),
                                  ("zero", torch.zeros_like(scan.trigger), scan.noise_scale),
                                  ("true", true, backdoor.gamma),
                                  ("true, channel means removed", true_zero_mean, backdoor.gamma)):
        repaired = copy.deepcopy(model)
        spec.runner(spec.make_config(progress=False)).apply(repaired, trigger.float(), noise_scale=gamma)
        row = {"trigger_norm": float(trigger.norm()), "noise_scale": gamma}
        for s in samplers:
            agree = metrics.agreement(metrics.generate(repaired, args.count, s, MEASURE_STEPS[s]), original[s])
            row[s] = {"asr_after": metrics.attack_success(repaired, backdoor, s, MEASURE_STEPS[s],
                                                          args.count).attack_success,
                      "mse_to_original": agree.mse, "ssim_to_original": agree.ssim}
        rows[f"{method} / {label} trigger"] = row
        print(method, label, json.dumps(to_jsonable(rows[f"{method} / {label} trigger"])), flush=True)

out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(to_jsonable({"versions": versions(), "model": args.model, "sampler": sampler,
                                       "count": args.count, "runs": rows}), indent=2) + "\n")
print("wrote", out)
