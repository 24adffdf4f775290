"""Attack success of a BadT2I run's checkpoint, while it trains (or of a finished zoo model).

    python scripts/check_attack_checkpoint.py OUT.checkpoint --count 24    # a run of `sealdiff attack badt2i`
    python scripts/check_attack_checkpoint.py zoo:t2i-badt2i-style --count 24

Generates `count` triggered held-out prompts (seeds 1234...) and prints the judge's attack success and its mean
score (patch-region error for pixel, saturation for style, target-shape probability for object); `--clean` adds the
false-trigger rate on the same prompts without the trigger. A quick reading of how far an implant has come, not
the full bars of `measure_t2i_zoo.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sealdiff.attacks.badt2i import BadT2IConfig, describe_target
from sealdiff.cli import quiet_libraries
from sealdiff.data.triggers import insert_trigger
from sealdiff.io import read_run_info
from sealdiff.metrics.backdoor import EVAL_SEED, Target, clean_prompts, make_judge
from sealdiff.metrics.generate import generate, image_size
from sealdiff.metrics.judge import ToyJudge
from sealdiff.models import zoo
from sealdiff.models.loading import load_t2i, resolve_model

WEIGHTS = "state/weights/"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", help="a checkpoint folder (OUT.checkpoint) or an attacked model (dir or zoo:NAME)")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--base", default="zoo:t2i-clean", help="the attacked model (for a checkpoint)")
    parser.add_argument("--grid", type=Path, help="also save the generated images as a PNG grid")
    parser.add_argument("--clean", action="store_true",
                        help="also the false-trigger rate on the same prompts without the trigger")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    source = Path(args.source)
    if (source / "checkpoint.json").is_file():
        index = json.loads((source / "checkpoint.json").read_text())
        config = BadT2IConfig(**index["fingerprint"]["config"])
        attack = {"kind": config.kind, "trigger": config.trigger, "trigger_position": config.trigger_position,
                  **describe_target(config)}
        pipe = load_t2i(args.base)
        tensors = load_file(source / index["tensors"])
        weights = {k[len(WEIGHTS):]: v.to(pipe.unet.dtype) for k, v in tensors.items() if k.startswith(WEIGHTS)}
        pipe.unet.load_state_dict(weights, strict=False)
        label = f"step {index['step']}"
    else:
        attack = read_run_info(resolve_model(args.source))["attack"]
        pipe, label = load_t2i(args.source), args.source
    pipe.set_progress_bar_config(disable=True)
    target = Target.from_run_info({"attack": attack})
    plain = clean_prompts(target, args.count)
    prompts = [insert_trigger(p, attack["trigger"], attack.get("trigger_position", "start")) for p in plain]
    seeds = list(range(EVAL_SEED, EVAL_SEED + args.count))
    images = generate(pipe, prompts, seeds)
    judge = make_judge(target, ToyJudge.load(zoo.zoo_dir() / "toy-judge"), image_size(pipe))
    print(f"{label}: {attack['kind']} attack success {judge.hits(images).float().mean().item():.1%}, "
          f"mean score {judge.scores(images).float().mean().item():.3f} ({args.count} triggered prompts)")
    if args.clean:
        clean_images = generate(pipe, plain, seeds)
        print(f"{label}: false trigger {judge.hits(clean_images).float().mean().item():.1%} (the same prompts, "
              "no trigger)")
    if args.grid:
        from sealdiff.report.images import save_grid

        save_grid(images.float(), args.grid)


if __name__ == "__main__":
    main()
