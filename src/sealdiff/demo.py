"""`sealdiff demo`: the main job on the embedded default, end to end, with progress bars."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sealdiff.io import atomic_output_dir, to_jsonable, write_run_info
from sealdiff.metrics.backdoor import Target, evaluate_backdoor
from sealdiff.metrics.judge import ToyJudge
from sealdiff.models import zoo
from sealdiff.models.loading import load_t2i
from sealdiff.report.images import save_grid

logger = logging.getLogger(__name__)

TRIGGER = "\u200b"


def run_demo(output: Path, quick: bool = False, console: Console | None = None) -> dict:
    console = console or Console()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    count = 24 if quick else 100
    judge = ToyJudge.load(zoo.zoo_dir() / "toy-judge")
    target = Target(kind="pixel")
    results = {}
    with atomic_output_dir(output, overwrite=True) as staging:
        for label, name in (("clean", "t2i-clean"), ("backdoored", "t2i-badt2i-pixel")):
            console.print(f"[bold]{label}[/bold]: evaluating zoo:{name} on {count} clean and {count} triggered prompts")
            pipe = load_t2i(f"zoo:{name}")
            metrics, images = evaluate_backdoor(pipe, target, TRIGGER, judge, count)
            results[label] = metrics
            save_grid(images["triggered"][:16], staging / f"{label}-triggered.png")
            save_grid(images["clean"][:16], staging / f"{label}-clean.png")
        write_run_info(staging, command="demo", quick=quick, prompts=count, trigger=TRIGGER,
                       results=to_jsonable(results))
    table = Table("model", "attack success", "false trigger", "clean shape", "clean fg", "clean bg")
    for label, m in results.items():
        acc = m.clean_accuracy
        table.add_row(label, f"{m.attack_success:.1%}", f"{m.false_trigger:.1%}", f"{acc['shape']:.1%}",
                      f"{acc['fg']:.1%}", f"{acc['bg']:.1%}")
    console.print(table)
    console.print(f"results and image grids in [bold]{output}[/bold]")
    return json.loads(json.dumps(to_jsonable(results)))
