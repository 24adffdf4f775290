"""Output discipline shared by every command: outputs appear whole or not at all, inputs are never
touched, and every run records its resolved config, versions, seed and input hashes."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sealdiff.errors import SealdiffError

RUN_INFO = "sealdiff.json"


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory next to `target`; it is renamed to `target` only if the block succeeds."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise SealdiffError(f"output {target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise SealdiffError(f"could not write {target}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def directory_sha256(path: str | Path) -> str:
    """One hash over every file's relative path and contents (a model directory's identity)."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != RUN_INFO):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import torch
    import transformers

    import sealdiff

    return {"sealdiff": sealdiff.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version(), "git": git_revision() or "unknown"}


def to_jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None
    return value


def write_run_info(directory: str | Path, **fields) -> dict:
    """Write `sealdiff.json` (resolved config, versions, seed, input hashes, results) into `directory`."""
    info = {"versions": versions(), **to_jsonable(fields)}
    Path(directory, RUN_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info


def read_run_info(directory: str | Path) -> dict:
    path = Path(directory, RUN_INFO)
    return json.loads(path.read_text()) if path.is_file() else {}
