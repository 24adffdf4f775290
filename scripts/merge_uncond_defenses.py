"""Replace the rows of some detectors / removal methods in benchmarks/results/uncond_defenses.json (or, with --into,
uncond_detection.json) by those of a newer `measure_uncond_defenses.py` run over the same zoo and settings (e.g.
after a change to one method only);
every other row is kept as measured, and the merged file records which run each row comes from.

    python scripts/merge_uncond_defenses.py NEW.json [--into benchmarks/results/uncond_defenses.json] [--note TEXT]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("new")
parser.add_argument("--into", default="benchmarks/results/uncond_defenses.json")
parser.add_argument("--note", default="", help="why these rows were remeasured")
args = parser.parse_args()

base, new = json.loads(Path(args.into).read_text()), json.loads(Path(args.new).read_text())
same = ("count", "steps", "noise_seed", "asr_mse_threshold", "threads", "halves", "removal_samplers")
if not (base["removal"] and new["removal"]):  # a detection-only file: the removal samplers were never used
    same = same[:-1]
if {k: base["config"].get(k) for k in same} != {k: new["config"].get(k) for k in same} or base["models"] != new["models"]:
    sys.exit(f"{args.new} was measured on another zoo or with other settings ({', '.join(same)}); not merged")

base["detection"].update(new["detection"])
methods = sorted({m for record in new["removal"].values() for m in record["methods"]})
for name, record in new["removal"].items():
    base["removal"].setdefault(name, {**record, "methods": {}})["methods"].update(record["methods"])
base["table"] = [row for row in base["table"] if row["method"] not in methods] + new["table"]
base.setdefault("merged", []).append({"detectors": sorted(new["detection"]), "methods": methods,
                                      "versions": new["versions"], "overrides": new["config"]["overrides"],
                                      "note": args.note})
Path(args.into).write_text(json.dumps(base, indent=2) + "\n")
print(f"merged detectors {sorted(new['detection'])} and methods {methods} into {args.into}")
