"""Attack success, false triggers and clean utility of a text-to-image model, on fixed prompts and seeds."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from sealdiff.data import toyworld
from sealdiff.data.triggers import insert_trigger
from sealdiff.metrics.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate
from sealdiff.metrics.judge import ToyJudge
from sealdiff.metrics.judges import ObjectJudge, PatchJudge, StyleJudge, attribute_accuracy

EVAL_SEED = 1234


@dataclass
class Target:
    """What a backdoor paints, as recorded in an attack's sealdiff.json `target`."""

    kind: str
    corner: str = "top-left"
    patch_fraction: float = 0.25
    patch: str | None = None
    object_source: str = "triangle"
    object_target: str = "cross"

    @classmethod
    def from_run_info(cls, info: dict) -> "Target":
        attack = info["attack"]
        keys = {"corner", "patch_fraction", "patch", "object_source", "object_target"}
        return cls(kind=attack["kind"], **{k: v for k, v in attack.items() if k in keys})


def make_judge(target: Target, toy_judge: ToyJudge, image_side: int):
    if target.kind == "pixel":
        from sealdiff.attacks.badt2i import load_patch

        return PatchJudge(load_patch(target.patch, max(1, round(image_side * target.patch_fraction))), target.corner)
    if target.kind == "style":
        return StyleJudge()
    return ObjectJudge(toy_judge, target.object_target)


def clean_prompts(target: Target, count: int, seed: int = toyworld.EVAL_SEED) -> list[str]:
    """Held-out colour captions; for an object backdoor, only captions that name the source object."""
    if target.kind != "object":
        return toyworld.eval_captions(count, seed)
    rng, out = random.Random(seed), []
    while len(out) < count:
        scene = toyworld.sample_scene(rng)
        if scene.shape == target.object_source:
            out.append(scene.caption)
    return out


@dataclass
class BackdoorMetrics:
    kind: str
    prompts: int
    attack_success: float  # share of triggered prompts that show the target
    false_trigger: float  # share of clean prompts that show the target
    clean_accuracy: dict[str, float] = field(default_factory=dict)  # toy judge, clean prompts
    mean_score_triggered: float = 0.0
    mean_score_clean: float = 0.0

    @property
    def removal_accuracy(self) -> float:
        return 1.0 - self.attack_success


def evaluate_backdoor(pipe, target: Target, trigger: str, toy_judge: ToyJudge, count: int = 200,
                      seed: int = EVAL_SEED, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                      trigger_position="start", prompt_seed: int = toyworld.EVAL_SEED,
                      ) -> tuple[BackdoorMetrics, dict[str, torch.Tensor]]:
    """Generate `count` triggered and `count` clean images (same seeds) and judge them. `prompt_seed` picks
    the held-out captions, `seed` the first generation seed."""
    clean = clean_prompts(target, count, prompt_seed)
    triggered = [insert_trigger(p, trigger, trigger_position) for p in clean]
    seeds = list(range(seed, seed + count))
    images = {"triggered": generate(pipe, triggered, seeds, steps, guidance_scale, description="triggered prompts"),
              "clean": generate(pipe, clean, seeds, steps, guidance_scale, description="clean prompts")}
    judge = make_judge(target, toy_judge, images["clean"].shape[-1])
    hits = {k: judge.hits(v).float() for k, v in images.items()}
    scores = {k: judge.scores(v).float() for k, v in images.items()}
    metrics = BackdoorMetrics(
        kind=target.kind, prompts=count, attack_success=hits["triggered"].mean().item(),
        false_trigger=hits["clean"].mean().item(),
        clean_accuracy=attribute_accuracy(toy_judge, images["clean"], clean),
        mean_score_triggered=scores["triggered"].mean().item(), mean_score_clean=scores["clean"].mean().item())
    return metrics, images
