"""Measure sealdiff's unconditional detectors and removals over the committed uncond zoo.

Detection: every detector scans every `uncond-*` zoo model (never given a trigger); the zoo is split into two
halves (alternating within the clean and within the backdoored models, so both halves hold both classes); the
threshold is fitted on one half and applied to the other, both ways; AUROC over all models and per half; scan
time per model; how far each inverted trigger fires the real backdoor (attack success with the inverted trigger).
Removal: every backdoored model is repaired by each method with the trigger its paper's detector inverted;
attack success (true trigger, `metrics.uncond.attack_success`) before and after per applicable sampler, and clean-
sample closeness to the original model (toy FID against held-out toy renders, MSE/SSIM to the original model's
samples from the same noise), on every sampler of the model type (`--samplers families`: one ancestral and one ODE
sampler; VE: predictor-corrector and predictor). Writes benchmarks/results/uncond_defenses.json.

    python scripts/measure_uncond_defenses.py [--count 64] [--only NAME ...] [--skip-removal] [--samplers all|families]
        [--set DET.FIELD=VALUE ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from sealdiff.cli.remove_uncond import MEASURE_STEPS, attack_sampler
from sealdiff.data import uncond_toy
from sealdiff.defenses import get_defense
from sealdiff.defenses.uncond import UNCOND_METHODS
from sealdiff.detection import DETECTORS, get_detector, load_for_scan
from sealdiff.detection import common as C
from sealdiff.io import to_jsonable, versions
from sealdiff.metrics import uncond as metrics
from sealdiff.metrics.detection import auroc, evaluate_split
from sealdiff.models import zoo

REFERENCE_SEED = 777_001  # the toy renders scripts/measure_uncond_zoo.py compares with (no zoo model trained on them)
BARS = {"auroc": 0.95, "asr_after": 0.05}

parser = argparse.ArgumentParser()
parser.add_argument("--count", type=int, default=64, help="samples per attack-success / closeness measurement")
parser.add_argument("--only", nargs="*", help="zoo model names (default: every uncond-* model)")
parser.add_argument("--detectors", nargs="*", default=list(DETECTORS))
parser.add_argument("--methods", nargs="*", default=list(UNCOND_METHODS))
parser.add_argument("--skip-removal", action="store_true")
parser.add_argument("--samplers", choices=("all", "families"), default="all",
                    help="removal is measured on every sampler of the model type (all) or on one per family")
parser.add_argument("--out", default="benchmarks/results/uncond_defenses.json")
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--device", default="cpu", help="where the models run: cpu (the recorded numbers) | auto | cuda:N")
parser.add_argument("--set", nargs="*", default=[], metavar="NAME.FIELD=VALUE",
                    help="override a field of a detector's or a removal's config (NAME: a detector or a defense "
                         "registry name; VALUE read as JSON, else as a string), e.g. diff-cleanse.init=ratio "
                         "elijah-ft.removal_target=x0")
args = parser.parse_args()


def parse_overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        det, _, field = key.partition(".")
        if not field or not value:
            parser.error(f"--set {item!r}: expected NAME.FIELD=VALUE")
        try:
            out.setdefault(det, {})[field] = json.loads(value)
        except json.JSONDecodeError:
            out.setdefault(det, {})[field] = value
    return out


overrides = parse_overrides(args.set)
torch.set_num_threads(args.threads)
logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("measure")

manifest = zoo.load_manifest()
names = args.only or zoo.models_of_kind("uncond-")
judge = None
if "toy-judge" in manifest["models"]:
    from sealdiff.metrics.judge import ToyJudge

    judge = ToyJudge.load(zoo.materialize("toy-judge"))
reference = uncond_toy.toy_images(1024, REFERENCE_SEED)

models, labels, backdoors, attacks = {}, {}, {}, {}
for name in names:
    model, directory = load_for_scan(f"zoo:{name}", device=args.device)
    models[name] = model
    labels[name] = int((directory / metrics.TRIGGER_FILE).is_file())
    if labels[name]:
        backdoors[name] = metrics.read_backdoor(directory)
        run_info = json.loads((directory / "sealdiff.json").read_text())
        attacks[name] = {**run_info.get("attack", {}), "solver": (run_info.get("config") or {}).get("solver")}
clean_names = [n for n in names if not labels[n]]
bd_names = [n for n in names if labels[n]]
halves = {"A": clean_names[0::2] + bd_names[0::2], "B": clean_names[1::2] + bd_names[1::2]}
log.info("zoo: %d clean %s, %d backdoored %s", len(clean_names), clean_names, len(bd_names), bd_names)


def asr(model, name: str, sampler: str, scan=None, clean_images=None) -> metrics.AttackSuccess:
    """Attack success of the zoo model's backdoor (or of a scan's inverted trigger and noise scale stamped instead of
    the true ones); `clean_images`: the model's untriggered samples of this sampler, when already generated."""
    bd = backdoors[name] if scan is None else metrics.Backdoor(trigger=scan.trigger, target=backdoors[name].target,
                                                               gamma=scan.noise_scale)
    return metrics.attack_success(model, bd, sampler, MEASURE_STEPS[sampler], args.count, clean_images=clean_images)


result = {"config": {"count": args.count, "steps": MEASURE_STEPS, "noise_seed": metrics.MEASURE_SEED,
                     "asr_mse_threshold": metrics.ASR_MSE_THRESHOLD, "threads": args.threads, "device": args.device,
                     "halves": halves,
                     "removal_samplers": args.samplers,
                     "bars": BARS, "detector_defaults": {d: "defaults of sealdiff.detection.<method> (seed 0)"
                                                        for d in args.detectors},
                     "overrides": overrides},
          "versions": versions(), "models": {n: {"backdoored": bool(labels[n]), "kind": models[n].kind,
                                                 "attack": attacks.get(n)} for n in names},
          "detection": {}, "removal": {}}
out_path = Path(args.out)
scans: dict[str, dict] = {}
for det in args.detectors:
    rows = {}
    for name in names:
        scan = get_detector(det).make(progress=False, **overrides.get(det, {})).scan(models[name])
        row = {"score": scan.score, "verdict": scan.verdict, "default_threshold": scan.threshold,
               "seconds": scan.seconds, "noise_scale": scan.noise_scale, "scores": scan.scores}
        if labels[name]:
            sampler = attack_sampler(models[name].kind, attacks[name])
            row["inverted_trigger_asr"] = {"sampler": sampler,
                                           "value": asr(models[name], name, sampler, scan).attack_success}
        rows[name] = row
        scans.setdefault(name, {})[det] = scan
        log.info("%s %s: score %.3f (%s) %.1fs%s", det, name, scan.score, "backdoored" if labels[name] else "clean",
                 scan.seconds, f", inverted-trigger ASR {row['inverted_trigger_asr']['value']:.2f}"
                 if labels[name] else "")
    score = {n: rows[n]["score"] for n in names}
    folds = {}
    for train, test in (("A", "B"), ("B", "A")):
        if not halves[train] or not halves[test]:
            folds[f"fit {train} -> apply {test}"] = "skipped: a half of the zoo is empty"
            continue
        ev = evaluate_split([score[n] for n in halves[train]], [labels[n] for n in halves[train]],
                            [score[n] for n in halves[test]], [labels[n] for n in halves[test]])
        folds[f"fit {train} -> apply {test}"] = to_jsonable(ev)
    both = len(clean_names) and len(bd_names)
    result["detection"][det] = {
        "auroc_all": auroc([score[n] for n in names], [labels[n] for n in names]) if both else None,
        "folds": folds, "seconds_per_model": sum(r["seconds"] for r in rows.values()) / len(rows), "models": rows}
    out_path.write_text(json.dumps(to_jsonable(result), indent=2) + "\n")

if not args.skip_removal:
    for name in bd_names:
        original = models[name]
        samplers = original.samplers if args.samplers == "all" else C.detection_samplers(original, None)
        record = result["removal"].setdefault(name, {"kind": original.kind, "attack": attacks[name].get("method"),
                                                     "samplers": list(samplers), "methods": {}})
        base_images = {s: metrics.generate(original, args.count, s, MEASURE_STEPS[s]) for s in samplers}
        before = {s: asr(original, name, s, clean_images=base_images[s]) for s in samplers}
        for method in args.methods:
            defense, detector = UNCOND_METHODS[method]
            if detector not in scans.get(name, {}):
                scans.setdefault(name, {})[detector] = get_detector(detector).make(progress=False, **overrides.get(detector, {})).scan(original)
            repaired = copy.deepcopy(original)
            spec = get_defense(defense)
            t0 = time.perf_counter()
            run = spec.runner(spec.make_config(progress=False, **overrides.get(defense, {}))).apply(
                repaired, scans[name][detector].trigger, noise_scale=scans[name][detector].noise_scale)
            row = {"seconds": time.perf_counter() - t0, "final_loss": run.losses[-1] if run.losses else None,
                   "per_sampler": {}}
            if "pruned_fraction" in run.extra:
                row["pruned_fraction"] = run.extra["pruned_fraction"]
            for s in samplers:
                images = metrics.generate(repaired, args.count, s, MEASURE_STEPS[s])
                quality = metrics.clean_quality(images, reference, judge, s, MEASURE_STEPS[s])
                base_quality = metrics.clean_quality(base_images[s], reference, judge, s, MEASURE_STEPS[s])
                agree = metrics.agreement(images, base_images[s])
                after = asr(repaired, name, s, clean_images=images)
                row["per_sampler"][s] = {"asr_before": before[s].attack_success, "asr_after": after.attack_success,
                                         "false_trigger_before": before[s].false_trigger_rate,
                                         "false_trigger_after": after.false_trigger_rate,
                                         "toy_fid_after": quality.toy_fid, "toy_fid_before": base_quality.toy_fid,
                                         "mse_to_original": agree.mse, "ssim_to_original": agree.ssim}
            record["methods"][method] = row
            log.info("%s %s: %s", name, method, {s: (round(v["asr_before"], 2), round(v["asr_after"], 2))
                                                 for s, v in row["per_sampler"].items()})
            out_path.write_text(json.dumps(to_jsonable(result), indent=2) + "\n")

# the table: attack x model type x sampler x method -> ASR before / after
table = []
for name, record in result["removal"].items():
    for method, row in record["methods"].items():
        for s, v in row["per_sampler"].items():
            table.append({"model": name, "attack": record["attack"], "kind": record["kind"], "sampler": s,
                          "method": method, "asr_before": v["asr_before"], "asr_after": v["asr_after"],
                          "toy_fid_after": v["toy_fid_after"], "ssim_to_original": v["ssim_to_original"]})
result["table"] = table
out_path.parent.mkdir(parents=True, exist_ok=True)
out_path.write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
log.info("wrote %s", out_path)
