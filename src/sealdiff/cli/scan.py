"""`sealdiff scan` (registered on the main app): detect a backdoor in an unconditional model and invert its trigger."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from sealdiff.cli.app import (ConfigOption, DeviceOption, OverwriteOption, PickleOption, SeedOption, ThreadsOption,
                              _threads, app, console)
from sealdiff.errors import SealdiffError

logger = logging.getLogger(__name__)


@app.command()
def scan(
    model: str = typer.Argument(..., help="unconditional model directory (DDPMPipeline / ScoreSdeVePipeline / "
                                         "LDMPipeline) or zoo:NAME"),
    output: Path = typer.Option(..., "-o", "--output", help="new folder: scan.json, trigger.safetensors, "
                                                            "trigger.png, sealdiff.json"),
    method: str = typer.Option("elijah", help="elijah | diff-cleanse | diffdefend"),
    threshold: Optional[float] = typer.Option(None, help="decision threshold of the method's score"),
    sampler: Optional[str] = typer.Option(None, help="elijah / diffdefend: the one stock sampler of the detection "
                                                     "samples (default: ddpm and ddim; sde-ve and "
                                                     "sde-ve-predictor for ncsn)"),
    epochs: Optional[int] = typer.Option(None, help="optimisation steps of the inversion"),
    seed: Optional[int] = SeedOption, config: Optional[Path] = ConfigOption, overwrite: bool = OverwriteOption,
    allow_pickle: bool = PickleOption, threads: Optional[int] = ThreadsOption, device: str = DeviceOption,
) -> None:
    """Scan an unconditional model: invert the trigger (never given) and decide clean / backdoored."""
    from sealdiff.detection import get_detector, load_for_scan, scan_grids, write_scan
    from sealdiff.io import atomic_output_dir, directory_sha256

    _threads(threads)
    spec = get_detector(method)  # unknown names: one line listing the valid ones
    if sampler is not None and method == "diff-cleanse":
        raise SealdiffError("--sampler applies to elijah and diffdefend; diff-cleanse picks its chains (config 'chains')")
    detector = spec.make(config, threshold=threshold, samplers=[sampler] if sampler else None, epochs=epochs,
                         seed=seed)
    if output.exists() and not overwrite:
        raise SealdiffError(f"output {output} already exists; pass --overwrite to replace it")
    uncond, directory = load_for_scan(model, allow_pickle=allow_pickle, device=device)
    if getattr(detector.config, "samplers", None):
        from sealdiff.detection.common import detection_samplers

        detection_samplers(uncond, detector.config.samplers)  # a sampler the model's kind lacks: one line
    parent_sha256 = directory_sha256(directory)
    with atomic_output_dir(output, overwrite, inputs=[directory]) as staging:
        result = detector.scan(uncond)
        write_scan(result, staging, model, parent_sha256, uncond.kind, uncond.device, scan_grids(uncond, result))
    console.print(f"{method}: [bold]{result.verdict}[/bold] (score {result.score:.3f}, threshold {result.threshold:g}); "
                  f"inverted trigger in {output / 'trigger.safetensors'}"
                  + (f" (input {result.noise_scale:g}·ε + trigger)" if result.noise_scale != 1.0 else ""))
