"""Attacks that build backdoored test subjects. `run_attack` loads, attacks and saves atomically."""

from __future__ import annotations

import logging
from pathlib import Path

from sealdiff.attacks.badt2i import BadT2I, BadT2IConfig, describe_target
from sealdiff.io import atomic_output_dir, check_not_input, directory_sha256, write_run_info
from sealdiff.models.loading import load_t2i, resolve_model

logger = logging.getLogger(__name__)

ATTACKS = {"badt2i": (BadT2I, BadT2IConfig)}


def run_attack(model: str, config: BadT2IConfig, output: str | Path, overwrite: bool = False,
               allow_pickle: bool = False) -> Path:
    """Implant a BadT2I backdoor into the pipeline at `model`; write a new pipeline directory to `output`."""
    parent = resolve_model(model)
    check_not_input(output, [parent])
    pipe = load_t2i(parent, allow_pickle=allow_pickle)
    losses = BadT2I(config).run(pipe)
    with atomic_output_dir(output, overwrite) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        write_run_info(staging, command="attack", method="badt2i", config=config, seed=config.seed,
                       attack={"kind": config.kind, "trigger": config.trigger,
                               "trigger_position": config.trigger_position, **describe_target(config)},
                       parent={"path": str(model), "sha256": directory_sha256(parent)},
                       losses=losses)
    logger.info("wrote %s", output)
    return Path(output)
