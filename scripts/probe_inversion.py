"""Whether, and why, the inverted triggers miss: each objective at the true trigger, at zero and at the trigger found.

For every backdoored unconditional zoo model (or `--only NAME ...`), the inversions of `--detectors` run with their
default configs (`elijah:paper` = Elijah with objective='paper'); the Elijah loss, the BBTI loss and the response
ratio λ̂ at T and at T/2 (`common.response_ratios`, direction normalised to the ratio search's norm with channel
means removed) are then evaluated on one fixed noise batch at the true trigger (read from the model's record, used
here only as a diagnostic), at τ = 0 and at the inverted τ; plus the cosine similarity of inverted vs true (also with
channel means removed: the ratio search's candidates are zero-mean) and norms. If the true trigger scores *worse*
than the found one, the objective itself prefers a spurious trigger; if it scores better, the optimiser missed the
basin. Writes benchmarks/results/inversion_probe.json.

    python scripts/probe_inversion.py [--only NAME ...] [--detectors elijah elijah:paper diffdefend diff-cleanse]
"""
from __future__ import annotations

import argparse
import json
import math
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
parser.add_argument("--detectors", nargs="*", default=["elijah:paper", "diff-cleanse"])
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
        out = {"elijah_loss": float(elijah), "bbti_loss": float(bbti)}
        if trigger.abs().sum() > 0:
            shape = tuple(model.sample_shape)
            u = C.sphere_triggers((trigger / s).unsqueeze(0), shape, ElijahConfig().norm * math.prod(shape) ** 0.5)
            for frac in (1.0, 0.5):
                out[f"response_ratio_{frac}"] = float(C.response_ratios(model, model.unet, noise, u, C.level(model, frac)))
    return out


def zero_mean(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=(-2, -1), keepdim=True)).flatten()


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
    for det in args.detectors:
        method, _, objective = det.partition(":")
        found = get_detector(method).make(progress=False, **({"objective": objective} if objective else {})).scan(model)
        noise_scale, found = found.noise_scale, found.trigger
        row["inverted"][det] = {"norm": float(found.norm()), "noise_scale": noise_scale,
                                "cosine_to_true": float(F.cosine_similarity(found.flatten(), true.flatten(), dim=0)),
                                "cosine_to_true_zero_mean": float(F.cosine_similarity(zero_mean(found), zero_mean(true),
                                                                                      dim=0)),
                                **objectives(model, found, noise, stochastic)}
    rows[name] = row
    print(name, json.dumps(to_jsonable(row)), flush=True)

out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(to_jsonable({"versions": versions(), "batch": args.batch, "models": rows}), indent=2) + "\n")
print("wrote", out)
