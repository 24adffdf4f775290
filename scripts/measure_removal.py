"""Removal bars on the zoo: every method x backdoor kind, like the paper's Tables 1, 3 and 7.

For each backdoored zoo model and each method: repair (fixed recipe and seed), then measure on 200
triggered held-out prompts (removal accuracy = 1 - attack success), the toy attribute accuracy on clean
prompts against the backdoored model's, and the mean SSIM between repaired and backdoored images of the
same clean prompts and seeds. Writes benchmarks/results/removal.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from sealdiff.cli import quiet_libraries
from sealdiff.data import toyworld
from sealdiff.data.triggers import insert_trigger
from sealdiff.defenses.sau import SAUConfig, generate_with_sau
from sealdiff.defenses.skd import SelfKnowledgeDistillation, SKDConfig
from sealdiff.io import read_run_info, to_jsonable, versions
from sealdiff.metrics.backdoor import EVAL_SEED, Target, clean_prompts, evaluate_backdoor, make_judge
from sealdiff.metrics.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS
from sealdiff.metrics.judge import ToyJudge
from sealdiff.metrics.judges import attribute_hits, paired_drop
from sealdiff.metrics.utility import ssim
from sealdiff.models import zoo
from sealdiff.models.loading import load_t2i

PROMPT_SEED = 555  # repair prompts: disjoint from the evaluation stream
# --validation: captions and generation seeds disjoint from both, for choosing a recipe without the evaluation set
VALIDATION = {"prompt_seed": 20_000_003, "seed": 50_000}
RECIPE = {"steps": 300, "batch_size": 8, "lr": 1e-4, "trainable": "full", "seed": 0}
METHODS = {
    "finetune-reversal": {"method": "finetune-reversal"},
    "skd": {"method": "skd"},
    "skd-cag-noise": {"method": "skd-cag", "target": "noise"},
    "skd-cag-zero": {"method": "skd-cag", "target": "zero"},
    "skd-cag-random-word": {"method": "skd-cag", "target": "random-word"},
    "sau": None,  # inference time
}
BARS = {("pixel", "skd-cag-noise"): 0.99, ("style", "skd-cag-zero"): 0.95, ("object", "best"): 0.90,
        ("pixel", "sau"): 0.99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=100, help="repair prompts")
    parser.add_argument("--kinds", nargs="*", default=["pixel", "style", "object"])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--steps", type=int, nargs="+", default=[RECIPE["steps"]],
                        help="repair steps; several values run one repair each (rows keyed by the recipe)")
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--trainable", choices=["full", "attn2-kv", "lora"], default=RECIPE["trainable"])
    parser.add_argument("--retain-weight", type=float, default=0.0,
                        help="SKDConfig.retain_weight (clean and empty prompts kept close to the teacher); 0 = off")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="train with an EMA of the weights at this decay (SKDConfig.ema); 0 = off")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 each when two runs share 2 cores)")
    parser.add_argument("--validation", action="store_true",
                        help="measure on the validation captions and seeds (for choosing a recipe), not the evaluation ones")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/removal.json (removal_validation.json with --validation)")
    args = parser.parse_args()
    if args.out is None:
        args.out = Path("benchmarks/results", "removal_validation.json" if args.validation else "removal.json")
    options = {"retain_weight": args.retain_weight} if args.retain_weight else {}
    if args.ema_decay:
        options.update(ema=True, ema_decay=args.ema_decay)
    recipes = [{**RECIPE, "steps": steps, "lr": args.lr, "trainable": args.trainable, **options}
               for steps in args.steps]
    held_out = VALIDATION if args.validation else {"prompt_seed": toyworld.EVAL_SEED, "seed": EVAL_SEED}
    quiet_libraries()
    torch.set_num_threads(args.threads)
    judge = ToyJudge.load(zoo.zoo_dir() / "toy-judge")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.update({"versions": versions(), "recipe": RECIPE, "prompts": args.count, "held_out": held_out})
    rows = results.setdefault("rows", {})
    repair_scenes = toyworld.scenes(PROMPT_SEED, args.prompts)
    for kind in args.kinds:
        name = f"t2i-badt2i-{kind}"
        info = read_run_info(zoo.materialize(name))
        target, trigger = Target.from_run_info(info), info["attack"]["trigger"]
        backdoored = load_t2i(f"zoo:{name}")
        base, base_images = evaluate_backdoor(backdoored, target, trigger, judge, args.count, **held_out)
        captions = clean_prompts(target, args.count, held_out["prompt_seed"])
        base_hits = attribute_hits(judge, base_images["clean"], captions)
        rows[f"{kind}/backdoored"] = to_jsonable(base)
        runs = [(method, recipe) for method in args.methods for recipe in (recipes[:1] if METHODS[method] is None
                                                                           else recipes)]
        for method, recipe in runs:
            start = time.time()
            if METHODS[method] is None:
                seed = held_out["seed"]
                triggered = [insert_trigger(p, trigger, "start")
                             for p in clean_prompts(target, args.count, held_out["prompt_seed"])]
                images = generate_with_sau(backdoored, triggered, trigger, SAUConfig(),
                                           seeds=list(range(seed, seed + args.count)),
                                           num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE)
                judged = make_judge(target, judge, images.shape[-1]).hits(images.float()).float().mean().item()
                row = {"attack_success": judged, "removal_accuracy": 1 - judged, "clean": "unchanged (inference time)"}
            else:
                pipe = copy.deepcopy(backdoored)
                config = SKDConfig(trigger=trigger, **METHODS[method], **recipe)
                images_for_fr = torch.stack([toyworld.render(s) for s in repair_scenes]) \
                    if method == "finetune-reversal" else None
                result = SelfKnowledgeDistillation(config).apply(pipe, [s.caption for s in repair_scenes],
                                                                 images=images_for_fr)
                metrics, images = evaluate_backdoor(pipe, target, trigger, judge, args.count, **held_out)
                drop = max(base.clean_accuracy[k] - metrics.clean_accuracy[k] for k in base.clean_accuracy)
                hits = attribute_hits(judge, images["clean"], captions)
                row = {**to_jsonable(metrics), "removal_accuracy": metrics.removal_accuracy,
                       "max_clean_accuracy_drop": drop,
                       "clean_flips": {k: paired_drop(base_hits[k], hits[k]) for k in hits},
                       "ssim_vs_backdoored_clean": ssim(images["clean"], base_images["clean"]).mean().item(),
                       "train_seconds": result.seconds, "final_loss": result.losses[-1]}
            row["seconds"] = time.time() - start
            key = f"{kind}/{method}"
            if METHODS[method] is not None:
                row["recipe"] = recipe
                if recipe != RECIPE:
                    key += f"@steps={recipe['steps']},lr={recipe['lr']:g}" + (
                        "" if recipe["trainable"] == RECIPE["trainable"] else f",trainable={recipe['trainable']}") + (
                        f",retain={recipe['retain_weight']:g}" if "retain_weight" in recipe else "") + (
                        f",ema={recipe['ema_decay']:g}" if recipe.get("ema") else "")
            rows[key] = row
            drop, sim = row.get("max_clean_accuracy_drop"), row.get("ssim_vs_backdoored_clean")
            flips = row.get("clean_flips", {}).get("shape")
            print(f"{key:40s} removal {row['removal_accuracy']:.1%}"
                  + ("" if drop is None else f"  clean drop {drop * 100:.1f} pt  SSIM {sim:.3f}")
                  + ("" if flips is None else f"  shape: {flips['lost']} lost / {flips['gained']} gained, "
                                              f"drop {flips['drop'] * 100:.1f} ± {flips['ci95'] * 100:.1f} pt"),
                  flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(rows))


def markdown_table(rows: dict) -> str:
    kinds = sorted({k.split("/")[0] for k in rows})
    lines = ["| method | " + " | ".join(f"{k} removal | {k} clean-acc drop | {k} SSIM" for k in kinds) + " |",
             "|---|" + "---|" * (3 * len(kinds))]
    variants = sorted({k.split("/", 1)[1] for k in rows if "@" in k})  # rows of non-default recipes
    for method in ["backdoored", *METHODS, *variants]:
        cells = []
        for kind in kinds:
            row = rows.get(f"{kind}/{method}")
            if row is None:
                cells += ["–"] * 3
                continue
            removal = row.get("removal_accuracy", 1 - row.get("attack_success", 0))
            drop = row.get("max_clean_accuracy_drop")
            sim = row.get("ssim_vs_backdoored_clean")
            cells += [f"{removal:.1%}", "–" if drop is None else f"{drop * 100:+.1f} pt",
                      "–" if sim is None else f"{sim:.3f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
