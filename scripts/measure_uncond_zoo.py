"""Measure the unconditional zoo: per model and sampler, clean-sample quality (toy-likeness, toy FID) and, for
backdoored models, attack success (ASR), false-trigger rate and agreement with the clean base from the same
noise. Writes benchmarks/results/uncond_zoo.json (the README's numbers come from it).

    python scripts/measure_uncond_zoo.py [--count 100] [--only NAME ...]
"""
import argparse
import json
import logging
import time
from pathlib import Path

import torch

from sealdiff.cli.remove_uncond import MEASURE_STEPS as STEPS
from sealdiff.data import uncond_toy
from sealdiff.io import to_jsonable, versions
from sealdiff.metrics import uncond as metrics
from sealdiff.models import zoo
from sealdiff.models.uncond import SAMPLERS, load_uncond

DEFAULT_SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "sde-ve", "sde-ve-predictor")
AGREEMENT_SAMPLER = {"ddpm": "ddim", "ldm": "ddim", "ncsn": "sde-ve"}  # agreement with the clean base: one sampler
REFERENCE_SEED = 777_001  # toy renders no zoo model trained on (training pools use seeds < 100)

parser = argparse.ArgumentParser()
parser.add_argument("--count", type=int, default=64, help="samples per model, sampler and noise kind")
parser.add_argument("--samplers", nargs="*", default=list(DEFAULT_SAMPLERS),
                    help="samplers to measure, where they apply to a model's kind (all: " + ", ".join(STEPS) + ")")
parser.add_argument("--only", nargs="*", help="zoo model names (default: every uncond-* model)")
parser.add_argument("--out", default="benchmarks/results/uncond_zoo.json")
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--table-only", action="store_true", help="print the README tables of --out and exit")
args = parser.parse_args()
torch.set_num_threads(args.threads)
logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("measure")

manifest = zoo.load_manifest()
names = [] if args.table_only else args.only or sorted(n for n, e in manifest["models"].items() if str(e.get("kind", "")).startswith("uncond-"))
judge = None
if "toy-judge" in manifest["models"]:
    from sealdiff.metrics.judge import ToyJudge

    judge = ToyJudge.load(zoo.materialize("toy-judge"))
reference = uncond_toy.toy_images(2048, REFERENCE_SEED)
held_out = uncond_toy.toy_images(args.count, REFERENCE_SEED + 1)
out_path = Path(args.out)
results = json.loads(out_path.read_text()) if out_path.is_file() and (args.only or args.table_only) else {}
results.update({} if args.table_only else {
    "config": {"count": args.count, "steps": STEPS, "noise_seed": metrics.MEASURE_SEED,
               "asr_mse_threshold": metrics.ASR_MSE_THRESHOLD, "toy_like_mse": metrics.TOY_LIKE_MSE,
               "reference_renders": len(reference), "reference_seed": REFERENCE_SEED, "threads": args.threads,
               "samplers": args.samplers, "agreement_sampler": AGREEMENT_SAMPLER},
    "versions": versions(),
    # the quality measures applied to real held-out toy renders: the best a model can score
    "real_renders": to_jsonable(metrics.clean_quality(held_out, reference, judge, "real", 0)),
    "renders_to_targets": {},
})
for target in () if args.table_only else ("hat", "corner-box", "shifted-trigger", "in-class", "out-of-class"):
    image = uncond_toy.make_target(target, trigger=uncond_toy.make_trigger("stop-sign"))
    mse = metrics.per_image_mse(reference, image)
    results["renders_to_targets"][target] = {"min": float(mse.min()), "p01": float(mse.quantile(0.01)),
                                             "median": float(mse.median())}
models = results.setdefault("models", {})
for name in names:
    t0 = time.time()
    entry = manifest["models"][name]
    directory = zoo.materialize(name)
    model = load_uncond(directory)
    record = {"kind": model.kind, "base": entry.get("base"), "description": entry.get("description", ""),
              "quality": {}, "attack_success": {}, "agreement_with_base": {}}
    backdoor = None
    if (directory / metrics.TRIGGER_FILE).is_file():
        backdoor = metrics.read_backdoor(directory)
        record["attack"] = json.loads((directory / "sealdiff.json").read_text()).get("attack")
    base = load_uncond(zoo.materialize(entry["base"])) if entry.get("base") else None
    for sampler in [s for s in SAMPLERS[model.kind] if s in args.samplers]:
        steps = STEPS[sampler]
        clean = metrics.generate(model, args.count, sampler, steps)
        record["quality"][sampler] = to_jsonable(metrics.clean_quality(clean, reference, judge, sampler, steps))
        if backdoor is not None:
            result = metrics.attack_success(model, backdoor, sampler, steps, args.count, clean_images=clean)
            record["attack_success"][sampler] = to_jsonable(result)
        if base is not None and sampler == AGREEMENT_SAMPLER[model.kind]:
            record["agreement_with_base"][sampler] = to_jsonable(
                metrics.agreement(clean, metrics.generate(base, args.count, sampler, steps)))
        asr = record["attack_success"].get(sampler, {}).get("attack_success")
        log.info("%s %s: toy-like %.2f, toy FID %s%s", name, sampler, record["quality"][sampler]["toy_like"],
                 f"{record['quality'][sampler]['toy_fid']:.1f}" if judge else "-",
                 f", ASR {asr:.2f}" if asr is not None else "")
    record["seconds"] = round(time.time() - t0, 1)
    models[name] = record
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.only and out_path.is_file():  # another run may have added models meanwhile: keep them
        latest = json.loads(out_path.read_text())
        results["models"] = {**latest.get("models", {}), **{n: models[n] for n in models if n in args.only}}
        models = results["models"]
    out_path.write_text(json.dumps(to_jsonable(results), indent=2) + "\n")  # after every model
if not args.table_only:
    log.info("wrote %s", out_path)


def markdown(results: dict) -> str:
    """The README tables, generated from the measured results."""
    samplers = [s for s in DEFAULT_SAMPLERS if s in results["config"]["samplers"]]
    lines = ["| model | kind | backdoor | " + " | ".join(f"ASR {s}" for s in samplers) + " | false trigger | "
             "agreement with base (MSE / SSIM) |", "|---" * (5 + len(samplers)) + "|"]
    quality = ["| model | " + " | ".join(f"toy-like / toy FID, {s}" for s in samplers) + " |",
               "|---" * (1 + len(samplers)) + "|"]
    real = results["real_renders"]
    quality.append(f"| real held-out renders | " + " | ".join(
        f"{real['toy_like']:.0%} / {real['toy_fid']:.1f}" if real.get("toy_fid") is not None else f"{real['toy_like']:.0%}"
        for _ in samplers) + " |")
    for name, rec in sorted(results["models"].items()):
        q = rec["quality"]
        quality.append(f"| `{name}` | " + " | ".join(
            (f"{q[s]['toy_like']:.0%} / {q[s]['toy_fid']:.1f}" if q[s].get("toy_fid") is not None
             else f"{q[s]['toy_like']:.0%}") if s in q else "—" for s in samplers) + " |")
        if not rec["attack_success"]:
            continue
        a = rec["attack"]
        what = f"{a['method']}: {a['trigger']} → {a['target']}" + (f" (γ {a['gamma']:g})" if a["gamma"] != 1 else "")
        asr = rec["attack_success"]
        false = max(v["false_trigger_rate"] for v in asr.values())
        agree = next(iter(rec["agreement_with_base"].values()), None)
        lines.append(f"| `{name}` | {rec['kind']} | {what} | " + " | ".join(
            f"{asr[s]['attack_success']:.0%}" if s in asr else "—" for s in samplers)
            + f" | {false:.0%} | " + (f"{agree['mse']:.3f} / {agree['ssim']:.2f}" if agree else "—") + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(quality) + "\n"


print(markdown(json.loads(out_path.read_text())))
