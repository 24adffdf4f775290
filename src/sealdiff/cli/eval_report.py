"""`sealdiff eval` and `sealdiff report` (registered on the main app)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from sealdiff.cli import decode_escapes
from sealdiff.cli.app import ConfigOption, OverwriteOption, PickleOption, ThreadsOption, app, console
from sealdiff.errors import SealdiffError


def _fmt(metric) -> str:
    return "—" if metric.value is None else f"{metric.value:.4g}"


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="pipeline directory or zoo:NAME (text-to-image or unconditional)"),
    trigger: Optional[str] = typer.Option(None, help="trigger (default: from the model's sealdiff.json); \\u200b escapes allowed"),
    kind: Optional[str] = typer.Option(None, help="pixel | style | object (default: from sealdiff.json)"),
    trigger_position: Optional[str] = typer.Option(None, help="start | end | word index (default: from sealdiff.json)"),
    count: Optional[int] = typer.Option(None, help="prompts per set [200]; unconditional: samples per set [50]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="image i uses seed SEED+i [1234]; unconditional: the noise seed"),
    steps: Optional[int] = typer.Option(None, help="sampling steps [20]; unconditional: per sampler (ddpm 40, sde-ve 200, else 20)"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale [4.0]"),
    batch_size: Optional[int] = typer.Option(None, help="images per generation batch [50]"),
    judge: Optional[Path] = typer.Option(None, help="toy judge directory (default: the zoo's)"),
    reference: Optional[str] = typer.Option(None, help="reference model (pre-attack / pre-repair) for SSIM/MSE/FID"),
    clip: Optional[Path] = typer.Option(None, help="local CLIPModel directory for the CLIP score"),
    lpips: Optional[Path] = typer.Option(None, help="LPIPS AlexNet weights (.safetensors) for LPIPS vs reference"),
    fid_features: Optional[Path] = typer.Option(None, help="local transformers vision model directory for FID"),
    label: Optional[str] = typer.Option(None, help="run label in reports (default: the model's name)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write an evaluation run directory here"),
    config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption, allow_pickle: bool = PickleOption,
    threads: Optional[int] = ThreadsOption,
    device: Optional[str] = typer.Option(None, "--device", help="where the pipelines generate: auto (the GPU / "
                                                                "accelerator torch sees, else the CPU) | cpu | cuda:N"),
    sampler: Optional[str] = typer.Option(None, help="unconditional: the sampler, or 'all' (default: the one the "
                                                     "recorded attack targets)"),
    trigger_file: Optional[Path] = typer.Option(None, "--trigger-file",
                                                help="unconditional: a scan's inverted trigger or an attack's recorded "
                                                     "one (default: the model's own attack record)"),
) -> None:
    """Per-judge attack success, false triggers, removal accuracy and utility on fixed prompts and seeds; for an
    unconditional model, per sampler: attack success, the samples' collapse under the trigger, MSE / SSIM to a
    reference model from the same noise."""
    import dataclasses

    from sealdiff.config import build_config
    from sealdiff.metrics.backdoor import Target
    from sealdiff.metrics.evaluate import EvalConfig, TARGET_KINDS, attack_from_model, evaluate_model
    from sealdiff.models.loading import require_t2i, resolve_model
    from sealdiff.models.uncond import uncond_kind

    if threads:
        import torch

        torch.set_num_threads(threads)
    if output is not None and output.exists() and not overwrite:
        raise SealdiffError(f"output {output} already exists; pass --overwrite to replace it")
    if uncond_kind(resolve_model(model)) is not None:
        _evaluate_uncond(model, output, count, sampler, steps, seed, trigger_file, reference, label, device,
                         allow_pickle, overwrite,
                         text_to_image_only={"--trigger": trigger, "--kind": kind, "--trigger-position": trigger_position,
                                             "--guidance": guidance, "--batch-size": batch_size, "--judge": judge,
                                             "--clip": clip, "--lpips": lpips, "--fid-features": fid_features,
                                             "--config": config})
        return
    if sampler is not None or trigger_file is not None:
        raise SealdiffError("--sampler and --trigger-file apply to unconditional models")
    if kind is not None and kind not in TARGET_KINDS:
        raise SealdiffError(f"--kind {kind!r} is invalid; valid: {', '.join(TARGET_KINDS)}")
    cfg = build_config(EvalConfig, config, count=count, seed=seed, steps=steps, guidance=guidance,
                       batch_size=batch_size, judge=judge, reference=reference, clip=clip, lpips=lpips,
                       fid_features=fid_features, trigger_position=trigger_position, label=label,
                       allow_pickle=allow_pickle or None, device=device)
    directory = resolve_model(model)
    require_t2i(directory)
    attack = attack_from_model(directory)
    target = Target.from_run_info({"attack": attack}) if attack.get("kind") else Target(kind=kind or "pixel")
    if kind:
        target = dataclasses.replace(target, kind=kind)
    trig = decode_escapes(trigger) if trigger else attack.get("trigger")
    if not trig:
        raise SealdiffError("no trigger given and the model's sealdiff.json names none; pass --trigger")
    result = evaluate_model(model, trig, target, cfg,
                            output=output, overwrite=overwrite)

    table = Table("judge", "attack success (triggered)", "false trigger (clean)", "removal accuracy",
                  title=f"{result.label}: {result.config.count} prompts, backdoor {target.kind}")
    for name, m in result.judges.items():
        mark = " *" if name == result.primary_judge else ""
        table.add_row(name + mark, f"{m.attack_success:.1%}", f"{m.false_trigger:.1%}", f"{m.removal_accuracy:.1%}")
    console.print(table)
    utility = Table("utility (clean prompts)", "value", "note")
    for key, value in result.utility.attribute_accuracy.items():
        utility.add_row(f"clean {key} accuracy", f"{value:.1%}", "toy judge")
    for key in ("ssim", "mse", "lpips", "toy_fid", "fid", "clip_score"):
        metric = getattr(result.utility, key)
        utility.add_row(key, _fmt(metric), metric.reason or metric.source or "")
    console.print(utility)
    if output:
        console.print(f"evaluation run written to [bold]{output}[/bold]")


def _evaluate_uncond(model, output, count, sampler, steps, seed, trigger_file, reference, label, device, allow_pickle,
                     overwrite, text_to_image_only: dict) -> None:
    from sealdiff.cli.uncond import evaluate_uncond
    from sealdiff.metrics.uncond import MEASURE_SEED
    from sealdiff.cli.uncond import refuse_text_to_image_flags
    from sealdiff.models.loading import resolve_model

    refuse_text_to_image_flags(resolve_model(model), text_to_image_only, "--count, --sampler, --steps, --seed, "
                               "--trigger-file, --reference, --label and --device")
    record = evaluate_uncond(model, output, 50 if count is None else count, sampler, steps, MEASURE_SEED if seed is None else seed,
                             trigger_file, reference, label, device or "auto", allow_pickle, overwrite)
    table = Table("sampler", "attack success", "false trigger", "collapse", "SSIM to reference", "MSE to reference",
                  title=f"{record['label']}: {record['count']} samples per set")
    for name, row in record["per_sampler"].items():
        attack, close = row["attack"], row["reference"]
        table.add_row(name, *(f"{attack[k]:.1%}" if attack else "—" for k in ("attack_success", "false_trigger_rate")),
                      "—" if row["collapse"] is None else f"{row['collapse']:.3f}",
                      *((f"{close['ssim']:.3f}", f"{close['mse']:.4f}") if close else ("—", "—")))
    console.print(table)
    if output:
        console.print(f"evaluation run written to [bold]{output}[/bold]")


@app.command("report")
def report(
    runs: list[Path] = typer.Argument(..., help="evaluation run directories (from `sealdiff eval -o`), unconditional "
                                                "scans (`sealdiff scan -o`) or removal outputs (`sealdiff remove -o`)"),
    output: Path = typer.Option(..., "-o", "--output", help="HTML file to write"),
    title: str = typer.Option("sealdiff report", help="page title"),
    overwrite: bool = OverwriteOption,
) -> None:
    """One self-contained HTML page: grids per run for the same prompts and seeds, metrics, plots, losses (for
    unconditional scans: verdicts, scores, samples with and without the inverted trigger; for unconditional removals:
    attack success per sampler before/after, before/after grids, inverted triggers)."""
    from sealdiff.report.html import write_report

    write_report(runs, output, title=title, overwrite=overwrite)
    console.print(f"report written to [bold]{output}[/bold]")
