"""Attacks that build backdoored test subjects. `run_attack` loads, attacks and saves atomically."""

from __future__ import annotations

import logging
from pathlib import Path

from sealdiff.attacks.badt2i import BadT2I, BadT2IConfig, describe_target
from sealdiff.io import atomic_output_dir, check_not_input, directory_sha256, write_run_info
from sealdiff.models.loading import load_t2i, resolve_model
from sealdiff.training import Checkpointer

logger = logging.getLogger(__name__)

ATTACKS = {"badt2i": (BadT2I, BadT2IConfig)}


def run_attack(model: str, config: BadT2IConfig, output: str | Path, overwrite: bool = False,
               allow_pickle: bool = False, checkpoint_every: int = 0, resume: bool = False) -> Path:
    """Implant a BadT2I backdoor into the pipeline at `model`; write a new pipeline directory to `output`.

    `checkpoint_every` N > 0 saves a checkpoint to `<output>.checkpoint/` every N steps and on
    SIGINT/SIGTERM; `resume` continues from it (same model and config only). The checkpoint folder is
    removed once `output` is complete."""
    parent = resolve_model(model)
    check_not_input(output, [parent])
    parent_sha256 = directory_sha256(parent)
    checkpointer = None
    if checkpoint_every or resume:
        checkpointer = Checkpointer.next_to(output, checkpoint_every, resume=resume, overwrite=overwrite,
                                            inputs=[parent], context={"command": "attack",
                                                                      "parent_sha256": parent_sha256})
    pipe = load_t2i(parent, allow_pickle=allow_pickle)
    losses = BadT2I(config).run(pipe, checkpointer=checkpointer)
    with atomic_output_dir(output, overwrite) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        write_run_info(staging, command="attack", method="badt2i", config=config, seed=config.seed,
                       attack={"kind": config.kind, "trigger": config.trigger,
                               "trigger_position": config.trigger_position, **describe_target(config)},
                       parent={"path": str(model), "sha256": parent_sha256},
                       losses=losses)
    if checkpointer is not None:
        checkpointer.remove()
    logger.info("wrote %s", output)
    return Path(output)
