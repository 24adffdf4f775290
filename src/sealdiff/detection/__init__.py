"""Backdoor detection and trigger inversion for unconditional diffusion models.

The contract every detector keeps (one file per paper: `elijah.py`, `diffcleanse.py`, `diffdefend.py`):

- a dataclass config, validated in `__post_init__` (bad values are a `SealdiffError` naming the valid ones);
- `Detector(config).scan(model: UncondModel) -> ScanResult`: the trigger is *inverted* (the detector is never
  given the true one), samples are drawn from noise stamped with it, and a score (higher = more likely
  backdoored) is compared with the config's `threshold`;
- `DETECTORS` maps a method name to its spec; `get_detector(name)` refuses unknown names listing the valid ones.

Triggers are tensors of the model's x_T shape (C, H, W), in x_T units: `x_T = noise_scale·sample_noise(...) + trigger`
(the noise scale γ is 1 except for a TrojDiff-style trojan input, which Elijah's and DiffDefend's searches and
Diff-Cleanse's trojan chain also find).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sealdiff.config import help_field
from sealdiff.detection import common as C
from sealdiff.errors import SealdiffError
from sealdiff.registry import MethodSpec, lookup

logger = logging.getLogger(__name__)


@dataclass
class ScanResult:
    """What one scan found. `score` is the detector's primary score (higher = backdoored) and `backdoored`
    is `score >= threshold`; `scores` holds every statistic measured (the primary one included)."""

    method: str
    backdoored: bool
    score: float
    threshold: float
    scores: dict[str, float]
    trigger: torch.Tensor
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    noise_scale: float = 1.0  # γ of the inverted input x_T = γ·ε + trigger (the ddpm sampler's step noise too)

    @property
    def verdict(self) -> str:
        return "backdoored" if self.backdoored else "clean"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the trigger tensor is saved separately, as safetensors and PNG)."""
        return {"method": self.method, "verdict": self.verdict, "backdoored": self.backdoored, "score": self.score,
                "threshold": self.threshold, "scores": dict(self.scores), "seconds": self.seconds,
                "trigger_shape": list(self.trigger.shape), "trigger_l2": float(self.trigger.norm()),
                "noise_scale": self.noise_scale,
                "config": self.config, "losses": list(self.losses)}


@dataclass
class Inversion:
    """An inverted trigger with the noise scale γ of its input x_T = γ·ε + trigger, the optimisation's losses and,
    when the inversion already measured them on this trigger (to choose among candidates), its statistics."""

    trigger: torch.Tensor
    noise_scale: float = 1.0
    losses: list[float] = field(default_factory=list)
    scores: dict[str, float] | None = None


class Detector:
    """Base class: subclasses set `name`, take their config in `__init__`, and implement `invert` and
    `statistics`; `scan` times the whole run and applies the threshold. A detector whose inversion also finds the
    noise scale γ of the input (x_T = γ·ε + τ), or measures its candidates' statistics, overrides `inversion`
    instead of `invert`."""

    name = "detector"
    primary = "score"

    def __init__(self, config) -> None:
        self.config = config

    def invert(self, model) -> tuple[torch.Tensor, list[float]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inversion(self, model) -> Inversion:
        """The inverted trigger; γ = 1 unless the detector searches it."""
        trigger, losses = self.invert(model)
        return Inversion(trigger, losses=losses)

    def statistics(self, model, trigger: torch.Tensor, gamma: float = 1.0
                   ) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def ratio_searches(self, model, searches: list[tuple[float, str, float]], description: str) -> Inversion:
        """Runs each response-ratio search (frac of T, 'min' | 'max', noise scale γ) with the config's search fields
        (`common.best_ratio_trigger`), samples each winner and keeps the one whose samples collapse most. Collapse, not
        a combined score, picks: the TV term of a harmless candidate is noisy (clean DDPM: |log| ~0.6). Searches with
        γ ≠ 1 are skipped for ncsn: a VE model has no scaled-noise (trojan) process."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        best, losses = None, []
        for frac, direction, gamma in searches:
            if gamma != 1.0 and model.kind == "ncsn":
                continue
            name = f"{frac}:{direction}" + (f":{gamma}" if gamma != 1.0 else "")
            trigger, ratio, run = C.best_ratio_trigger(model, cfg, frac, direction, generator,
                                                       f"{description} {name}", cfg.progress, gamma)
            losses += run
            stats = self.statistics(model, trigger, gamma)
            logger.info("%s search %s: ratio %.3f, collapse %.3f %s", description, name, ratio, stats["collapse"],
                        {k: round(v, 3) for k, v in stats.items() if k.startswith(("collapse", "tv_log"))})
            if best is None or stats["collapse"] > best.scores["collapse"]:
                best = Inversion(trigger, gamma, scores=stats)
        if best is None:
            raise SealdiffError(f"every search of {description} scales the noise (γ ≠ 1), which a {model.kind} model "
                                "never does; add one with γ = 1")
        best.losses = losses
        return best

    def scan(self, model) -> ScanResult:
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            found = self.inversion(model)
            trigger, gamma = found.trigger.detach().to("cpu", torch.float32), found.noise_scale
            scores = found.scores if found.scores is not None else self.statistics(model, trigger, gamma)
        score = float(scores[self.primary])
        threshold = float(self.config.threshold)
        return ScanResult(method=self.name, backdoored=score >= threshold, score=score, threshold=threshold,
                          scores=scores, trigger=trigger, seconds=time.perf_counter() - start,
                          config=dataclasses.asdict(self.config), losses=found.losses, noise_scale=float(gamma))


@dataclass(frozen=True)
class DetectorSpec(MethodSpec):
    def make(self, config_file=None, **overrides) -> Detector:
        """The detector with its config built from an optional YAML/JSON file and `overrides` (None = default)."""
        from sealdiff.config import build_config

        return self.runner(build_config(self.config_cls, config_file, **overrides))


DETECTORS: dict[str, DetectorSpec] = {
    "elijah": DetectorSpec("elijah", "Elijah: invert τ from the distribution shift at T; uniformity + TV of samples",
                           "sealdiff.detection.elijah.ElijahConfig", "sealdiff.detection.elijah.ElijahDetector"),
    "diff-cleanse": DetectorSpec("diff-cleanse", "Diff-Cleanse BBTI: invert τ so samples collapse; MSCR",
                                 "sealdiff.detection.diffcleanse.DiffCleanseConfig",
                                 "sealdiff.detection.diffcleanse.DiffCleanseDetector"),
    "diffdefend": DetectorSpec("diffdefend", "DiffDefend: joint multi-timestep inversion; uniformity + TV detector",
                               "sealdiff.detection.diffdefend.DiffDefendConfig",
                               "sealdiff.detection.diffdefend.DiffDefendDetector"),
}


def get_detector(name: str) -> DetectorSpec:
    return lookup(DETECTORS, name, "detection method")


def check_positive(values: dict[str, Any], integer: bool = True) -> None:
    """Raise `SealdiffError` for any value that is not a positive integer (or number); None (= the default) passes."""
    for name, value in values.items():
        if value is None:
            continue
        ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
        if not ok or value <= 0:
            kind = "an integer >= 1" if integer else "a number > 0"
            raise SealdiffError(f"{name} {value!r} is invalid; valid: {kind}")


__all__ = ["DETECTORS", "Detector", "DetectorSpec", "Inversion", "ScanResult", "check_positive", "get_detector", "help_field"]


# --------------------------------------------------------------------------------------------------
# running a scan on a model directory (shared by `sealdiff scan` and `sealdiff remove`)

SCAN_FILE = "scan.json"
TRIGGER_SOURCE = "sealdiff scan"  # metadata of every inverted trigger.safetensors (removal refuses others)
SCAN_GRID_COUNT = 16  # samples per image grid of a scan


@torch.no_grad()
def scan_grids(model, result: ScanResult, count: int = SCAN_GRID_COUNT) -> dict[str, dict[str, torch.Tensor]]:
    """{sampler: {"inverted": images, "clean": images}} for a scan's image grids: `count` samples per detection
    sampler (the scan's own, or ddpm alone for a scaled input) from the scan's fixed noise stamped with the inverted
    trigger as it was inverted (x_T = γ·noise + trigger), and from the same noise without it."""
    from sealdiff.detection.elijah import offset_samples, trojan_samplers

    cfg, gamma = result.config, result.noise_scale
    steps = C.sample_steps(model, cfg.get("sample_steps"))
    offsets = {"inverted": result.trigger, "clean": torch.zeros_like(result.trigger)}
    return {sampler: {name: offset_samples(model, offset, count, sampler, steps, cfg["seed"], gamma)
                      for name, offset in offsets.items()}
            for sampler in trojan_samplers(model, cfg.get("samplers"), gamma)}


def load_for_scan(spec, allow_pickle: bool = False, device: str | torch.device = "cpu"):
    """(model, directory): an unconditional model loaded in float32 (the zoo stores fp16 weights) on `device`
    (`models.loading.resolve_device`: 'auto', 'cpu', 'cuda:1', ...)."""
    from sealdiff.models.loading import resolve_device, resolve_model
    from sealdiff.models.uncond import load_uncond, uncond_kind

    device = resolve_device(device)  # before the loading work: an unavailable device is one line
    directory = resolve_model(spec)
    if uncond_kind(directory) is None and (directory / "model_index.json").is_file():
        from sealdiff.models.loading import model_type

        raise SealdiffError(f"{directory} holds a {model_type(directory)}; scan needs an unconditional model "
                            "(DDPMPipeline, ScoreSdeVePipeline or LDMPipeline)")
    model = load_uncond(directory, allow_pickle=allow_pickle)
    model.unet.float()
    if model.vae is not None:
        model.vae.float()
        model.vae.requires_grad_(False)
    return model.to(device), directory


def write_scan(result: ScanResult, directory, model_spec: str, parent_sha256: str, model_kind: str,
               device: str | torch.device = "cpu", grids: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """scan.json (verdict + scores), trigger.safetensors, trigger.png, the `scan_grids` as grid_SAMPLER_SET.png and
    sealdiff.json into `directory`."""
    import json
    from pathlib import Path

    from sealdiff.defenses.uncond import save_trigger
    from sealdiff.io import to_jsonable, write_run_info
    from sealdiff.report.images import save_sampler_grids

    directory = Path(directory)
    summary = to_jsonable(result.to_dict())
    (directory / SCAN_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    save_trigger(result.trigger, directory, metadata={"source": TRIGGER_SOURCE, "method": result.method,
                                                      "parent_sha256": parent_sha256,
                                                      "noise_scale": repr(float(result.noise_scale))})
    save_sampler_grids(grids or {}, directory)
    write_run_info(directory, command="scan", method=result.method, config=result.config, seed=result.config["seed"],
                   model_kind=model_kind, device=str(device), parent={"path": str(model_spec), "sha256": parent_sha256},
                   grids={"count": len(next(iter(grids.values()))["inverted"]), "samplers": list(grids)} if grids else None,
                   result={k: v for k, v in summary.items() if k not in ("config", "losses")}, losses=result.losses)
