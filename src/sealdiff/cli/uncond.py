"""`sealdiff attack baddiffusion | trojdiff | villandiffusion` (unconditional models; registered on the main app)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sealdiff.cli.app import (CheckpointOption, ConfigOption, DeviceOption, LrScheduleOption, OverwriteOption,
                              PickleOption, ResumeOption, SeedOption, ThreadsOption, _threads, attack_app, console)
from sealdiff.errors import SealdiffError

ModelArg = typer.Argument(..., help="unconditional model directory (DDPMPipeline / ScoreSdeVePipeline / LDMPipeline) or zoo:NAME")
OutputOpt = typer.Option(..., "-o", "--output", help="new model directory")
TriggerOpt = typer.Option(None, help="grey-box | stop-sign | blend")
TriggerSizeOpt = typer.Option(None, "--trigger-size", help="patch triggers: side in pixels")
TriggerPositionOpt = typer.Option(None, "--trigger-position", help="bottom-right | bottom-left | top-right | top-left")
TriggerIntensityOpt = typer.Option(None, "--trigger-intensity", help="scale of the trigger pattern")
TargetOpt = typer.Option(None, help="hat | corner-box | shifted-trigger | in-class | out-of-class")
TargetPositionOpt = typer.Option(None, "--target-position", help="corner-box: its corner")
PoisonOpt = typer.Option(None, "--poison-fraction", help="fraction of each batch that is poisoned")
DataOpt = typer.Option(None, help="clean images: 'toy' (default) or a folder of image files")


def _run(method: str, model: str, output: Path, config: Optional[Path], overwrite: bool, allow_pickle: bool,
         threads: Optional[int], checkpoint_every: int, resume: bool, device: str, **fields) -> None:
    from sealdiff.attacks import ATTACKS, run_uncond_attack
    from sealdiff.config import build_config

    _threads(threads)
    cfg = build_config(ATTACKS[method][1], config, **fields)
    if output.exists() and not overwrite:
        raise SealdiffError(f"output {output} already exists; pass --overwrite to replace it")
    run_uncond_attack(method, model, cfg, output, overwrite=overwrite, allow_pickle=allow_pickle,
                      checkpoint_every=checkpoint_every, resume=resume, device=device)
    console.print(f"backdoored model written to [bold]{output}[/bold] (trigger in {output / 'trigger.safetensors'})")


@attack_app.command("baddiffusion")
def attack_baddiffusion(
    model: str = ModelArg, output: Path = OutputOpt, trigger: Optional[str] = TriggerOpt,
    trigger_size: Optional[int] = TriggerSizeOpt, trigger_position: Optional[str] = TriggerPositionOpt,
    trigger_intensity: Optional[float] = TriggerIntensityOpt, target: Optional[str] = TargetOpt,
    target_position: Optional[str] = TargetPositionOpt, poison_fraction: Optional[float] = PoisonOpt,
    data: Optional[str] = DataOpt,
    steps: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    lr_schedule: Optional[str] = LrScheduleOption, batch_size: Optional[int] = typer.Option(None),
    seed: Optional[int] = SeedOption,
    config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption, allow_pickle: bool = PickleOption,
    threads: Optional[int] = ThreadsOption, checkpoint_every: int = CheckpointOption, resume: bool = ResumeOption,
    device: str = DeviceOption,
) -> None:
    """BadDiffusion: x_T = noise + trigger makes a DDPM generate the target image."""
    _run("baddiffusion", model, output, config, overwrite, allow_pickle, threads, checkpoint_every, resume, device,
         trigger=trigger, trigger_size=trigger_size, trigger_position=trigger_position,
         trigger_intensity=trigger_intensity, target=target, target_position=target_position,
         poison_fraction=poison_fraction, data=data, steps=steps, lr=lr, lr_schedule=lr_schedule, batch_size=batch_size, seed=seed)


@attack_app.command("trojdiff")
def attack_trojdiff(
    model: str = ModelArg, output: Path = OutputOpt, trigger: Optional[str] = TriggerOpt,
    trigger_size: Optional[int] = TriggerSizeOpt, trigger_position: Optional[str] = TriggerPositionOpt,
    trigger_intensity: Optional[float] = TriggerIntensityOpt, target: Optional[str] = TargetOpt,
    target_position: Optional[str] = TargetPositionOpt, poison_fraction: Optional[float] = PoisonOpt,
    data: Optional[str] = DataOpt,
    mode: Optional[str] = typer.Option(None, help="blend (gamma 0.6) | patch (gamma 0.1)"),
    gamma: Optional[float] = typer.Option(None, help="noise scale of the trojan input (default by --mode)"),
    steps: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    lr_schedule: Optional[str] = LrScheduleOption, batch_size: Optional[int] = typer.Option(None),
    seed: Optional[int] = SeedOption,
    config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption, allow_pickle: bool = PickleOption,
    threads: Optional[int] = ThreadsOption, checkpoint_every: int = CheckpointOption, resume: bool = ResumeOption,
    device: str = DeviceOption,
) -> None:
    """TrojDiff: x_T = gamma*noise + (1-gamma)*trigger makes a DDPM generate the target image."""
    _run("trojdiff", model, output, config, overwrite, allow_pickle, threads, checkpoint_every, resume, device,
         trigger=trigger, trigger_size=trigger_size, trigger_position=trigger_position,
         trigger_intensity=trigger_intensity, target=target, target_position=target_position,
         poison_fraction=poison_fraction, data=data, mode=mode, gamma=gamma, steps=steps, lr=lr, lr_schedule=lr_schedule, batch_size=batch_size,
         seed=seed)


@attack_app.command("villandiffusion")
def attack_villandiffusion(
    model: str = ModelArg, output: Path = OutputOpt, trigger: Optional[str] = TriggerOpt,
    trigger_size: Optional[int] = TriggerSizeOpt, trigger_position: Optional[str] = TriggerPositionOpt,
    trigger_intensity: Optional[float] = TriggerIntensityOpt, target: Optional[str] = TargetOpt,
    target_position: Optional[str] = TargetPositionOpt, poison_fraction: Optional[float] = PoisonOpt,
    data: Optional[str] = DataOpt,
    solver: Optional[str] = typer.Option(None, help="sde (DDPM / SDE-VE samplers) | ode (DDIM, DPM-Solver++, ...)"),
    ve_trigger_weight: Optional[float] = typer.Option(None, "--ve-trigger-weight",
                                                      help="ncsn: x_T = sigma_max*(noise + w*trigger)"),
    steps: Optional[int] = typer.Option(None), lr: Optional[float] = typer.Option(None),
    lr_schedule: Optional[str] = LrScheduleOption, batch_size: Optional[int] = typer.Option(None),
    seed: Optional[int] = SeedOption,
    config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption, allow_pickle: bool = PickleOption,
    threads: Optional[int] = ThreadsOption, checkpoint_every: int = CheckpointOption, resume: bool = ResumeOption,
    device: str = DeviceOption,
) -> None:
    """VillanDiffusion: the noise-trigger backdoor for DDPM, NCSN (VE) and LDM models, SDE or ODE samplers."""
    _run("villandiffusion", model, output, config, overwrite, allow_pickle, threads, checkpoint_every, resume, device,
         trigger=trigger, trigger_size=trigger_size, trigger_position=trigger_position,
         trigger_intensity=trigger_intensity, target=target, target_position=target_position,
         poison_fraction=poison_fraction, data=data, solver=solver, ve_trigger_weight=ve_trigger_weight, steps=steps, lr=lr,
         lr_schedule=lr_schedule, batch_size=batch_size, seed=seed)
