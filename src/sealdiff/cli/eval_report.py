"""`sealdiff eval` and `sealdiff report` (registered on the main app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from sealdiff.cli import decode_escapes
from sealdiff.cli.app import PickleOption, app, console
from sealdiff.errors import SealdiffError


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="pipeline directory or zoo:NAME"),
    trigger: Optional[str] = typer.Option(None, help="trigger (default: from the model's sealdiff.json)"),
    kind: Optional[str] = typer.Option(None, help="pixel | style | object (default: from sealdiff.json)"),
    count: int = typer.Option(200, help="prompts per set"), seed: int = typer.Option(1234, "--seed"),
    judge: Optional[Path] = typer.Option(None, help="toy judge directory (default: the zoo's)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write metrics JSON here"),
    allow_pickle: bool = PickleOption,
) -> None:
    """Attack success, false-trigger rate and clean accuracy on fixed prompts and seeds."""
    from sealdiff.io import read_run_info, to_jsonable
    from sealdiff.metrics.backdoor import Target, evaluate_backdoor
    from sealdiff.metrics.judge import ToyJudge
    from sealdiff.models import zoo
    from sealdiff.models.loading import load_t2i, resolve_model

    directory = resolve_model(model)
    info = read_run_info(directory)
    attack = info.get("attack", {})
    target = Target.from_run_info(info) if attack else Target(kind=kind or "pixel")
    if kind:
        target.kind = kind
    trig = decode_escapes(trigger) if trigger else attack.get("trigger")
    if not trig:
        raise SealdiffError("no trigger given and the model's sealdiff.json names none; pass --trigger")
    pipe = load_t2i(directory, allow_pickle=allow_pickle)
    toy_judge = ToyJudge.load(judge or zoo.zoo_dir() / "toy-judge")
    metrics, _ = evaluate_backdoor(pipe, target, trig, toy_judge, count, seed,
                                   trigger_position=attack.get("trigger_position", "start"))
    table = Table("metric", "value")
    table.add_row("attack success (triggered)", f"{metrics.attack_success:.1%}")
    table.add_row("false trigger (clean)", f"{metrics.false_trigger:.1%}")
    for key, value in metrics.clean_accuracy.items():
        table.add_row(f"clean {key} accuracy", f"{value:.1%}")
    console.print(table)
    if output:
        output.write_text(json.dumps(to_jsonable(metrics), indent=2) + "\n")
