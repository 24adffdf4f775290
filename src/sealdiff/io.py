"""Output discipline shared by every command: outputs appear whole or not at all, inputs are never
touched, and every run records its resolved config, versions, seed and input hashes."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from sealdiff.errors import SealdiffError

RUN_INFO = "sealdiff.json"


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_input(target: str | Path, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an output that is, lies inside, or contains one of `inputs` (`--overwrite` would delete it)."""
    real = _real(target)
    for source in sorted(set(map(_real, inputs))):
        if real == source or source in real.parents or real in source.parents:
            raise SealdiffError(f"output {target} would overwrite the input {source}; choose another output path")


def _prepare_parent(target: Path, overwrite: bool) -> None:
    try:
        exists = target.exists() or target.is_symlink()
    except OSError as exc:
        raise SealdiffError(f"cannot write {target}: {exc.strerror or exc}") from None
    if exists and not overwrite:
        raise SealdiffError(f"output {target} already exists; pass --overwrite to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SealdiffError(f"cannot create the output folder {target.parent}: {exc.strerror or exc}") from None


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is moved aside first and restored if the rename
    fails, so a failure never leaves the user with neither the old nor the new output."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                os.rename(old, target)
        raise
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False,
                      inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a staging directory next to `target`; it is renamed to `target` only if the block succeeds.
    On any failure (an exception, Ctrl-C, a full disk) the staging directory is removed and an existing
    `target` is left untouched. `target` may not be, lie inside or contain one of `inputs`."""
    target = Path(target)
    check_not_input(target, inputs)
    _prepare_parent(target, overwrite)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        staging.chmod(_umask_mode(0o777))  # mkdtemp makes it private; the output gets the usual mode
    except OSError as exc:
        raise SealdiffError(f"could not write {target}: {exc.strerror or exc}") from None
    try:
        yield staging
        _swap_into_place(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise SealdiffError(f"could not write {target}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(target: str | Path, overwrite: bool = False,
                       inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Like `atomic_output_dir` for one file: yield a staging path (same folder, same suffix) that
    replaces `target` only if the block succeeds; nothing is left behind otherwise."""
    target = Path(target)
    check_not_input(target, inputs)
    _prepare_parent(target, overwrite)
    if target.is_dir() and not target.is_symlink():
        raise SealdiffError(f"output {target} is a directory; expected a file path")
    try:
        handle, name = tempfile.mkstemp(prefix=f".{target.stem}.partial-", suffix=target.suffix, dir=target.parent)
        os.close(handle)
        os.chmod(name, _umask_mode(0o666))
    except OSError as exc:
        raise SealdiffError(f"could not write {target}: {exc.strerror or exc}") from None
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    except OSError as exc:
        _remove(staging)
        raise SealdiffError(f"could not write {target}: {exc.strerror or exc}") from None
    except BaseException:
        _remove(staging)
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


def git_revision(path: Path | None = None) -> str | None:
    """The commit of the checkout holding `path` (default: sealdiff's own source), with "+dirty" when tracked
    files differ from it, so a run made from uncommitted code does not claim a commit that lacks that code."""
    cwd = path or Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=cwd)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=10, cwd=cwd)
        return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
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
