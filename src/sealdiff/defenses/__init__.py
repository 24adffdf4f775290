"""Backdoor removal methods and their registry.

`DEFENSES` maps a method name to a `DefenseSpec`: its config class, the class that runs it, and whether
it trains weights (`training`: SKD family, apply(pipe, prompts) -> RemovalResult), works at
inference time (`inference`: SAU, a pipeline callback / `generate_with_sau`), or removes a backdoor from an
unconditional model with an inverted trigger (`uncond`: apply(model, trigger) -> UncondRemovalResult).
"""

from __future__ import annotations

from dataclasses import dataclass

from sealdiff.registry import MethodSpec, lookup


@dataclass(frozen=True)
class DefenseSpec(MethodSpec):
    kind: str  # "training" | "inference" | "uncond"

    def make_config(self, **fields):
        """The method's config with `fields`; for the SKD family `method` is set to this defense's name."""
        if self.kind == "training":
            fields = {**fields, "method": self.name}
        return self.config_cls(**fields)


def _skd(name: str, summary: str) -> DefenseSpec:
    return DefenseSpec(name, summary, "sealdiff.defenses.skd.SKDConfig",
                       "sealdiff.defenses.skd.SelfKnowledgeDistillation", kind="training")


DEFENSES: dict[str, DefenseSpec] = {
    "skd": _skd("skd", "self-knowledge distillation of the clean-prompt prediction"),
    "skd-cag": _skd("skd-cag", "SKD with cross-attention guidance on the trigger tokens"),
    "finetune-reversal": _skd("finetune-reversal", "baseline: fine-tune on clean images with triggered prompts"),
    "sau": DefenseSpec("sau", "feature unlearning guided by spatial attention (latent blending)",
                       "sealdiff.defenses.sau.SAUConfig", "sealdiff.defenses.sau.SAUCallback", kind="inference"),
    "elijah-ft": DefenseSpec("elijah-ft", "Elijah: fine-tune so the inverted trigger no longer shifts ε_θ at T and "
                             "along the chain (+ clean loss)", "sealdiff.defenses.elijah.ElijahRemovalConfig",
                             "sealdiff.defenses.elijah.ElijahRemoval", kind="uncond"),
    "diff-cleanse-prune": DefenseSpec("diff-cleanse-prune", "Diff-Cleanse: Taylor-importance channel pruning + "
                                      "clean/distillation fine-tuning", "sealdiff.defenses.pruning.PruningConfig",
                                      "sealdiff.defenses.pruning.DiffCleansePruning", kind="uncond"),
    "diffdefend-purify": DefenseSpec("diffdefend-purify", "DiffDefend: removal + retention loss against a frozen "
                                     "reference, no real data", "sealdiff.defenses.purification.PurificationConfig",
                                     "sealdiff.defenses.purification.DiffDefendPurification", kind="uncond"),
}


def get_defense(name: str) -> DefenseSpec:
    return lookup(DEFENSES, name, "defense")


__all__ = ["DEFENSES", "DefenseSpec", "get_defense"]
