"""The floor of the removal table: attack success of each backdoored uncond zoo model's *true* trigger on the clean
model it was implanted on (its zoo `base`), on every sampler of the model type, with the measurement settings of
`measure_uncond_defenses.py` (same noise seeds, steps and threshold). A repaired model cannot be expected below this.

    python scripts/measure_clean_parent_asr.py [--count 64] [--out benchmarks/results/uncond_clean_parent_asr.json]
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from sealdiff.cli.remove_uncond import MEASURE_STEPS
from sealdiff.detection import load_for_scan
from sealdiff.io import to_jsonable, versions
from sealdiff.metrics import uncond as metrics
from sealdiff.models import zoo

parser = argparse.ArgumentParser()
parser.add_argument("--count", type=int, default=64)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--out", default="benchmarks/results/uncond_clean_parent_asr.json")
args = parser.parse_args()
torch.set_num_threads(args.threads)
logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("floor")

manifest = zoo.load_manifest()["models"]
result = {"config": {"count": args.count, "steps": MEASURE_STEPS, "noise_seed": metrics.MEASURE_SEED,
                     "asr_mse_threshold": metrics.ASR_MSE_THRESHOLD, "threads": args.threads},
          "versions": versions(), "models": {}}
parents = {}
for name in zoo.models_of_kind("uncond-"):
    directory = load_for_scan(f"zoo:{name}")[1]
    if not (directory / metrics.TRIGGER_FILE).is_file():
        continue
    backdoor = metrics.read_backdoor(directory)
    parent_name = manifest[name]["base"]
    if parent_name not in parents:  # several backdoors share a clean parent
        parents[parent_name] = load_for_scan(f"zoo:{parent_name}")[0]
    parent = parents[parent_name]
    rows = {s: metrics.attack_success(parent, backdoor, s, MEASURE_STEPS[s], args.count) for s in parent.samplers}
    result["models"][name] = {"clean_parent": parent_name, "per_sampler": rows}
    log.info("%s on %s: %s", name, parent_name, {s: round(r.attack_success, 3) for s, r in rows.items()})
Path(args.out).write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
log.info("wrote %s", args.out)
