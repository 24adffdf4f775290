"""Which parts of a backdoor's true trigger fire, before and after a removal: one zoo model, one method, its own
detector's scan and its removal (both at `--seed`), then the attack success under `--samplers` of the true trigger r
at several strengths, of its per-channel mean alone, of r without that mean, and of the inverted trigger rescaled to
r's norm, on the original and on the repaired model. The inverted trigger has no channel means (the search removes
them), so this shows what a removal trained on it leaves.

    python scripts/probe_trigger_components.py --model uncond-ddpm-baddiffusion-box-hat --method diffdefend --seed 1 \\
        --out benchmarks/results/trigger_components_boxhat_diffdefend_seed1.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch

from sealdiff.cli.remove_uncond import MEASURE_STEPS
from sealdiff.defenses import get_defense
from sealdiff.defenses.uncond import UNCOND_METHODS
from sealdiff.detection import get_detector, load_for_scan
from sealdiff.io import to_jsonable, versions
from sealdiff.metrics import uncond as metrics

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--method", required=True, choices=list(UNCOND_METHODS))
parser.add_argument("--seed", type=int, default=0, help="seed of the scan and of the removal")
parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="removal config fields (JSON values)")
parser.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"])
parser.add_argument("--count", type=int, default=64)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--out", required=True)
parser.add_argument("--grid", default=None, help="also write 16 clean samples per sampler, original row over repaired "
                                                 "row, to this PNG")
args = parser.parse_args()
torch.set_num_threads(args.threads)

model, directory = load_for_scan(f"zoo:{args.model}")
backdoor = metrics.read_backdoor(directory)
defense, detector = UNCOND_METHODS[args.method]
scan = get_detector(detector).make(progress=False, seed=args.seed).scan(model)
settings = {"seed": args.seed, **{k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}}
repaired = copy.deepcopy(model)
spec = get_defense(defense)
config = spec.make_config(progress=False, **settings)
spec.runner(config).apply(repaired, scan.trigger, noise_scale=scan.noise_scale)

r, tau = backdoor.trigger, scan.trigger.float()
mean = r.mean(dim=(1, 2), keepdim=True).expand_as(r)
centred = r - mean
components = {"r": r, "0.5 r": 0.5 * r, "1.5 r": 1.5 * r, "2 r": 2 * r, "mean(r)": mean, "2 mean(r)": 2 * mean,
              "r - mean(r)": centred, "inverted, at |r|": tau * r.norm() / tau.norm()}
result = {"model": args.model, "method": args.method, "removal_config": dataclasses.asdict(config), "count": args.count,
          "versions": versions(), "scan_score": scan.score,
          "cosine_inverted_true": float((tau * r).sum() / (tau.norm() * r.norm())),
          "cosine_inverted_true_without_means": float((tau * centred).sum() / (tau.norm() * centred.norm())),
          "true_channel_means": r.mean(dim=(1, 2)).tolist(), "asr": {}}
models = {"original": model, "repaired": repaired}
clean = {(which, s): metrics.generate(m, args.count, s, MEASURE_STEPS[s]) for which, m in models.items()
         for s in args.samplers}
for name, trigger in components.items():
    probe = metrics.Backdoor(trigger=trigger, target=backdoor.target, gamma=backdoor.gamma)
    result["asr"][name] = {
        which: {s: metrics.attack_success(m, probe, s, MEASURE_STEPS[s], args.count,
                                          clean_images=clean[which, s]).attack_success for s in args.samplers}
        for which, m in models.items()}
    print(f"{name:18s}", json.dumps(result["asr"][name]), flush=True)
Path(args.out).write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
if args.grid:
    from sealdiff.report.images import save_grid

    rows = [clean[which, s][:16] for s in args.samplers for which in models]
    save_grid((torch.cat(rows) + 1) / 2, args.grid, columns=16)
