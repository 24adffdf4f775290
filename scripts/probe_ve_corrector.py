"""Why the zoo's NCSN backdoor fires on only part of its samples: the VE predictor-corrector sampler against the
predictor alone, at several step counts (attack success of uncond-ncsn-villan-box-outclass and toy-likeness of
uncond-ncsn-clean). Writes benchmarks/results/ve_corrector.json.

    python scripts/probe_ve_corrector.py [--steps 200 1000] [--count 64]
"""
import argparse
import json
from pathlib import Path

import torch

from sealdiff.data import uncond_toy
from sealdiff.io import to_jsonable, versions
from sealdiff.metrics import uncond as metrics
from sealdiff.models import zoo
from sealdiff.models.uncond import VE_SAMPLERS, load_uncond

REFERENCE_SEED = 777_001  # as measure_uncond_zoo.py
BACKDOORED, CLEAN = "uncond-ncsn-villan-box-outclass", "uncond-ncsn-clean"

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, nargs="+", default=[200, 1000])
parser.add_argument("--count", type=int, default=64)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ve_corrector.json"))
args = parser.parse_args()
torch.set_num_threads(args.threads)
reference = uncond_toy.toy_images(2048, REFERENCE_SEED)
backdoored, clean = load_uncond(f"zoo:{BACKDOORED}"), load_uncond(f"zoo:{CLEAN}")
backdoor = metrics.read_backdoor(zoo.materialize(BACKDOORED))
rows = []
for sampler in VE_SAMPLERS:
    for steps in args.steps:
        quality = metrics.clean_quality(metrics.generate(clean, args.count, sampler, steps), reference, None, sampler,
                                        steps)
        success = metrics.attack_success(backdoored, backdoor, sampler, steps, args.count)
        rows.append({"sampler": sampler, "steps": steps, "clean_toy_like": quality.toy_like,
                     "attack_success": success.attack_success, "false_trigger": success.false_trigger_rate,
                     "mse_triggered_median": success.mse_triggered_median})
        print(f"{sampler:18s} {steps:5d} steps: attack success {success.attack_success:.0%}, "
              f"clean toy-like {quality.toy_like:.0%}", flush=True)
args.out.write_text(json.dumps(to_jsonable({"versions": versions(), "count": args.count, "threads": args.threads,
                                            "backdoored": BACKDOORED, "clean": CLEAN, "rows": rows}), indent=2) + "\n")
