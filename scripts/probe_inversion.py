"""Why the inverted triggers miss: each inversion's own loss at the true trigger, at zero and at the trigger it found.

For every backdoored unconditional zoo model (or `--only NAME ...`), the Elijah and Diff-Cleanse (BBTI) inversions
run with their default configs; their objective is then evaluated on one fixed noise batch at the true trigger (read
from the model's record, used here only as a diagnostic), at τ = 0 and at the inverted τ; plus the cosine similarity
and norms of inverted vs true. If the true trigger scores *worse* than the found one, the objective itself prefers a
spurious trigger; if it scores better, the optimiser missed the basin. Writes benchmarks/results/inversion_probe.json.

    python scripts/probe_inversion.py [--only NAME ...] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from sealdiff.cli.remove_uncond import attack_sampler
from sealdiff.detection import get_detector, load_for_scan
from sealdiff.detection import common as C
from sealdiff.detection.diffcleanse import DiffCleanseConfig, bbti_loss
from sealdiff.detection.elijah import ElijahConfig, elijah_loss
from sealdiff.io import to_jsonable, versions
from sealdiff.metrics import uncond as metrics
from sealdiff.models import zoo

parser = argparse.ArgumentParser()
parser.add_argument("--only", nargs="*", help="zoo model names (default: every backdoored uncond-* model)")
parser.add_argument("--batch", type=int, default=32, help="noise samples of the fixed evaluation batch")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--out", default="benchmarks/results/inversion_probe.json")
args = parser.parse_args()
torch.set_num_threads(args.threads)


def objectives(model, trigger: torch.Tensor, noise: torch.Tensor, stochastic: bool) -> dict[str, float]:
    """Both inversions' objectives (their default configs) at `trigger` (x_T units) on the fixed `noise` batch."""
    s = C.noise_scale(model)
    elijah_cfg, bbti_cfg = ElijahConfig(), DiffCleanseConfig()
    with torch.no_grad():
        elijah = elijah_loss(model, model.unet, noise, (trigger / s).unsqueeze(0), elijah_cfg.lam)
        bbti = bbti_loss(model, model.unet, noise[:bbti_cfg.batch], trigger.unsqueeze(0), bbti_cfg.grad_steps, stochastic,
                         torch.Generator().manual_seed(1))
    return {"elijah_loss": float(elijah), "bbti_loss": float(bbti)}


rows = {}
for name in args.only or zoo.models_of_kind("uncond-"):
    model, directory = load_for_scan(f"zoo:{name}")
    if not (directory / metrics.TRIGGER_FILE).is_file():
        continue
    true = metrics.read_backdoor(directory).trigger.float()
    record = json.loads((directory / "sealdiff.json").read_text())
    stochastic = attack_sampler(model.kind, record.get("attack"), record.get("config")) != "ddim"
    noise = C.noise_like(model, args.batch, torch.Generator().manual_seed(123))
    row = {"true_norm": float(true.norm()), "at_true": objectives(model, true, noise, stochastic),
           "at_zero": objectives(model, torch.zeros_like(true), noise, stochastic), "inverted": {}}
    for det in ("elijah", "diff-cleanse"):
        found = get_detector(det).make(progress=False).scan(model).trigger
        row["inverted"][det] = {"norm": float(found.norm()),
                                "cosine_to_true": float(F.cosine_similarity(found.flatten(), true.flatten(), dim=0)),
                                **objectives(model, found, noise, stochastic)}
    rows[name] = row
    print(name, json.dumps(to_jsonable(row)), flush=True)

out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(to_jsonable({"versions": versions(), "batch": args.batch, "models": rows}), indent=2) + "\n")
print("wrote", out)
