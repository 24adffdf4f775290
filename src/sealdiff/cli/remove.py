"""`sealdiff remove` (registered on the main app)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sealdiff.cli import decode_escapes
from sealdiff.cli.app import (CheckpointOption, ConfigOption, DeviceOption, OverwriteOption, PickleOption,
                              ResumeOption, SeedOption, ThreadsOption, _threads, app, console)
from sealdiff.errors import SealdiffError

TRAINING_METHODS = ("skd", "skd-cag", "finetune-reversal")
PROMPT_SEED = 555  # removal prompts: a toy-world stream disjoint from the evaluation prompts


def removal_prompts(count: int, prompt_file: Optional[Path]) -> list[str]:
    if prompt_file is not None:
        from sealdiff.data.prompts import read_prompt_file

        return read_prompt_file(prompt_file)
    from sealdiff.data import toyworld

    return [s.caption for s in toyworld.scenes(PROMPT_SEED, count)]


@app.command()
def remove(
    model: str = typer.Argument(..., help="backdoored pipeline directory or zoo:NAME"),
    output: Path = typer.Option(..., "-o", "--output", help="repaired pipeline directory (or LoRA folder)"),
    method: str = typer.Option("skd-cag", help="text-to-image: skd | skd-cag | finetune-reversal; unconditional: "
                                               "elijah | diff-cleanse | diffdefend"),
    trigger: Optional[str] = typer.Option(None, help="the known trigger (default: the model's sealdiff.json)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="UTF-8 file, one clean prompt per line"),
    prompt_count: int = typer.Option(100, help="toy-world prompts when no --prompts file is given"),
    target: Optional[str] = typer.Option(None, help="skd-cag trigger target: noise | uniform | zero | random-word"),
    alpha: Optional[float] = typer.Option(None, help="skd-cag: L = alpha*L_attn + (1-alpha)*L_pred"),
    trainable: Optional[str] = typer.Option(None, help="full | attn2-kv | lora"),
    steps: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    retain_weight: Optional[float] = typer.Option(None, help="skd/skd-cag: weight of the clean-behaviour retention "
                                                             "loss (clean and empty prompts; 0 = off)"),
    save_format: Optional[str] = typer.Option(None, "--format", help="merged | lora (default: lora for LoRA)"),
    measure: int = typer.Option(50, help="prompts for the before/after measurement (0 skips it)"),
    seed: Optional[int] = SeedOption, config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption,
    allow_pickle: bool = PickleOption, threads: Optional[int] = ThreadsOption,
    checkpoint_every: int = CheckpointOption, resume: bool = ResumeOption,
    device: str = typer.Option("auto", "--device", help="unconditional: auto (the GPU / accelerator torch sees, else "
                                                        "the CPU) | cpu | cuda | cuda:N; text-to-image: auto | cpu "
                                                        "(more devices: accelerate launch)"),
    trigger_file: Optional[Path] = typer.Option(None, "--trigger-file",
                                                help="unconditional: a `sealdiff scan` output folder or its "
                                                     "trigger.safetensors (default: scan first)"),
    sampler: Optional[str] = typer.Option(None, help="unconditional: sampler of the before/after measurement, or "
                                                     "'all' (every sampler of the model type; default: the one the "
                                                     "attack targets)"),
    data: Optional[Path] = typer.Option(None, help="unconditional elijah / diff-cleanse: a folder of clean images for "
                                                   "the clean loss (default: data-free, the model's own samples)"),
) -> None:
    """Remove a backdoor: text-to-image with a known trigger (SKD, SKD-CAG, finetune reversal), or unconditional
    with an inverted trigger (Elijah, Diff-Cleanse pruning, DiffDefend purification)."""
    from sealdiff.defenses.uncond import UNCOND_METHODS

    if method in UNCOND_METHODS:
        from sealdiff.cli.remove_uncond import remove_uncond

        _threads(threads)
        remove_uncond(model, output, method, trigger_file=trigger_file, config=config,
                      overrides={"steps": steps, "lr": lr, "batch": batch_size, "seed": seed}, measure=measure,
                      sampler=sampler, overwrite=overwrite, allow_pickle=allow_pickle, data=data, device=device,
                      console=console)
        return
    if trigger_file is not None or sampler is not None or data is not None:
        raise SealdiffError("--trigger-file, --sampler and --data apply to the unconditional methods "
                            f"({', '.join(UNCOND_METHODS)})")
    from sealdiff.config import build_config
    from sealdiff.defenses import DEFENSES
    from sealdiff.defenses.skd import SKDConfig, SelfKnowledgeDistillation
    from sealdiff.io import directory_sha256, read_run_info
    from sealdiff.models.loading import load_t2i, resolve_model
    from sealdiff.training import Checkpointer

    _threads(threads)
    device = device.strip().lower()
    if device not in ("auto", "cpu"):
        raise SealdiffError(f"--device {device!r} does not apply to {method}; valid: auto, cpu (text-to-image removal "
                            "runs through Accelerate: `accelerate launch` picks its devices)")
    if method not in TRAINING_METHODS:
        if method not in DEFENSES or DEFENSES[method].kind == "uncond":
            valid = ", ".join((*TRAINING_METHODS, *UNCOND_METHODS))
            raise SealdiffError(f"unknown removal method {method!r}; valid: {valid} (sau: `sealdiff generate --defense sau`)")
        raise SealdiffError(f"{method} works at inference time; use `sealdiff generate --defense {method}`")
    if output.exists() and not overwrite:
        raise SealdiffError(f"output {output} already exists; pass --overwrite to replace it")
    directory = resolve_model(model)
    info = read_run_info(directory)
    attack = info.get("attack", {})
    trig = decode_escapes(trigger) if trigger else attack.get("trigger")
    if not trig:
        raise SealdiffError("no --trigger given and the model's sealdiff.json names none")
    cfg = build_config(SKDConfig, config, trigger=trig, method=method, target=target, alpha=alpha,
                       trainable=trainable, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                       retain_weight=retain_weight, trigger_position=attack.get("trigger_position"),
                       cpu=True if device == "cpu" else None)
    clean_prompts = removal_prompts(prompt_count, prompts)
    parent_sha256 = directory_sha256(directory)
    checkpointer = None
    if checkpoint_every or resume:
        checkpointer = Checkpointer.next_to(output, checkpoint_every, resume=resume, overwrite=overwrite,
                                            inputs=[directory], context={"command": "remove",
                                                                         "parent_sha256": parent_sha256})
    pipe = load_t2i(directory, allow_pickle=allow_pickle)
    images = None
    if method == "finetune-reversal":
        if prompts is not None:
            raise SealdiffError("finetune-reversal needs clean images: use the toy world (no --prompts)")
        import torch

        from sealdiff.data import toyworld

        size = pipe.vae.config.sample_size
        images = torch.stack([toyworld.render(s, size) for s in toyworld.scenes(PROMPT_SEED, prompt_count)])
    before = _measure(pipe, info, trig, measure)
    runner = SelfKnowledgeDistillation(cfg)
    result = runner.apply(pipe, clean_prompts, images=images, checkpointer=checkpointer)
    after = _measure(pipe, info, trig, measure)
    runner.save(pipe, output, result, format=save_format, overwrite=overwrite, inputs=[directory], trigger=trig,
                parent={"path": str(model), "sha256": parent_sha256}, attack=attack or None,
                measured={"before": before, "after": after, "prompts": measure} if before else None,
                losses=result.losses)
    if checkpointer is not None and runner.accelerator.is_main_process:
        checkpointer.remove()
    if before:
        console.print(f"attack success {before['attack_success']:.1%} -> {after['attack_success']:.1%} "
                      f"({measure} triggered prompts)")
    console.print(f"repaired model written to [bold]{output}[/bold]")


def _measure(pipe, info: dict, trigger: str, count: int) -> dict | None:
    """Attack success / clean accuracy on `count` toy prompts when the model records its attack."""
    if not count or "attack" not in info:
        return None
    from sealdiff.io import to_jsonable
    from sealdiff.metrics.backdoor import Target, evaluate_backdoor
    from sealdiff.metrics.judge import ToyJudge
    from sealdiff.models import zoo

    judge_dir = zoo.zoo_dir() / "toy-judge"
    if not judge_dir.is_dir():
        return None
    metrics, _ = evaluate_backdoor(pipe, Target.from_run_info(info), trigger, ToyJudge.load(judge_dir), count,
                                   trigger_position=info["attack"].get("trigger_position", "start"))
    return to_jsonable(metrics)
