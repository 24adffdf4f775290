"""Small pieces every training loop shares: prompt encoding, noising, progress bars, and checkpoints
(`Checkpointer`) that make long runs interruptible and resumable."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sealdiff.errors import SealdiffError

logger = logging.getLogger(__name__)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Token embeddings (B, L, D) as the UNet's `encoder_hidden_states`, like `StableDiffusionPipeline`."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0]


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`, drawn where `generator` lives (a CPU generator draws the same noise whatever
    device the latents are on); `offset` adds per-channel constant noise (lets the model shift mean colour)."""
    where = generator.device if generator is not None else latents.device
    noise = torch.randn(latents.shape, generator=generator, device=where, dtype=latents.dtype)
    if offset:
        noise = noise + offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator, device=where,
                                             dtype=latents.dtype)
    return noise.to(latents.device)


def draw_timesteps(scheduler, count: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """`count` training timesteps drawn uniformly (where `generator` lives), on `device`."""
    where = generator.device if generator is not None else device
    return torch.randint(0, scheduler.config.num_train_timesteps, (count,), generator=generator,
                         device=where).to(device)


def noisy_latents(scheduler, latents: torch.Tensor, generator: torch.Generator | None, offset: float = 0.0,
                  timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, noise, t) for uniformly drawn t, via `scheduler.add_noise`."""
    if timesteps is None:
        timesteps = draw_timesteps(scheduler, latents.shape[0], generator, latents.device)
    noise = sample_noise(latents, generator, offset)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict under the scheduler's `prediction_type` (SD 1.x: epsilon; SD 2.x: v)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise SealdiffError(f"unsupported prediction type {kind!r}; valid: epsilon, v_prediction, sample")


@contextlib.contextmanager
def progress_bar(description: str, total: int, disable: bool = False) -> Iterator:
    """A rich progress bar; yields `advance(n=1, **fields)`."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=disable, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            progress.update(task, advance=n, info=info)

        yield advance


def run_optimizer(optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor], steps: int,
                  description: str, progress: bool = True, after_step: Callable[[], None] | None = None,
                  accelerator=None) -> list[float]:
    """`steps` updates of `optimizer` on `loss_fn()` under a progress bar (`after_step()` after each update);
    a non-finite loss stops the run with a clear error. Returns the losses (with an `accelerator`: each the mean
    over its processes, so that all of them stop together; the main one shows the bar)."""
    losses: list[float] = []
    main = accelerator is None or accelerator.is_main_process
    with progress_bar(description, steps, disable=not (progress and main)) as advance:
        for i in range(steps):
            loss = loss_fn()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            value = float(gather_step(accelerator, loss)[0].mean())
            if not math.isfinite(value):
                raise SealdiffError(f"{description}: the loss became {value} at step {i + 1}; lower the learning rate")
            losses.append(value)
            advance(info=f"loss {value:.4f}")
    return losses


# --------------------------------------------------------------------------------------------------
# data parallelism: `accelerate launch`


PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=3)


def launched_processes() -> int:
    """How many processes `accelerate launch` (or torchrun) started for this run; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(cpu: bool = False, mixed_precision: str = "no"):
    """An `accelerate.Accelerator` for this process (`cpu`: force the CPU). Its process group waits up to
    `PROCESS_GROUP_TIMEOUT` at a collective: the others wait there while the main process alone scans, draws a bank
    or measures (`on_main`), which on a real model can outlast torch's default."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from sealdiff.models.loading import resolve_device

    launched = launched_processes()
    # Accelerate sets up a gloo (MULTI_CPU) process group only when told `cpu`; without it a multi-process
    # launch on a machine with no accelerator gives N independent runs.
    cpu = cpu or (launched > 1 and resolve_device("auto").type == "cpu")
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                              kwargs_handlers=[InitProcessGroupKwargs(backend=None, timeout=PROCESS_GROUP_TIMEOUT)])
    if launched > 1 and accelerator.num_processes != launched:
        logger.warning("launched as %d processes but accelerate runs %d (%s)", launched, accelerator.num_processes,
                       accelerator.distributed_type)
    return accelerator


def data_parallel_accelerator(device: str = "auto"):
    """The Accelerator of a run launched as several processes, or None for a single process (which trains on
    `device`). Under a multi-process launch Accelerate places the processes: `device` must be auto or cpu."""
    if launched_processes() == 1:
        return None
    if str(device).strip().lower() not in ("auto", "cpu"):
        raise SealdiffError(f"--device {device} cannot be combined with a {launched_processes()}-process launch "
                            "(Accelerate places each process); valid: auto, or cpu for CPU processes")
    accelerator = make_accelerator(cpu=str(device).strip().lower() == "cpu")
    if accelerator.num_processes != launched_processes():
        raise SealdiffError(f"launched as {launched_processes()} processes but Accelerate set up "
                            f"{accelerator.num_processes} ({accelerator.distributed_type}); they would all write the "
                            "same output")
    return accelerator


def gather_step(accelerator, values: torch.Tensor, checkpointer: "Checkpointer | None" = None
                ) -> tuple[torch.Tensor, bool | None]:
    """After a data-parallel step: (every process's `values` stacked as (N, ...) on the CPU, whether any process
    was asked to stop, so that all stop at this step); (values[None], None) for a single process."""
    if accelerator is None or accelerator.num_processes == 1:
        return values.detach()[None].cpu(), None
    flag = torch.tensor([float(checkpointer is not None and checkpointer.interrupted)])
    row = torch.cat([values.detach().float().flatten().cpu(), flag])
    gathered = accelerator.gather(row[None].to(accelerator.device)).cpu()
    return gathered[:, :-1].view(-1, *values.shape), bool(gathered[:, -1].max() > 0)


def on_main(accelerator, compute):
    """`compute()` on the main process only, its (CPU) result sent to every process: what all processes must share
    exactly (a generated bank, a channel selection), computed once."""
    if accelerator is None or accelerator.num_processes == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    box = [compute() if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


# --------------------------------------------------------------------------------------------------
# checkpoints: interruptible long runs

CHECKPOINT_SUFFIX = ".checkpoint"
CHECKPOINT_FORMAT = 1
_INDEX = "checkpoint.json"
_MARKERS = ("__tensor__", "__tuple__", "__items__")


def checkpoint_dir(output: str | Path) -> Path:
    """Where the checkpoints of a run writing `output` live: `<output>.checkpoint/`, next to it."""
    output = Path(output)
    return output.with_name(output.name + CHECKPOINT_SUFFIX)


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str, storages: set[int]) -> Any:
    """JSON-able form of nested dicts/lists/tuples/scalars; tensors go to `tensors` under their path."""
    if torch.is_tensor(value):
        tensor = value.detach().to("cpu")
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages or not tensor.is_contiguous():  # safetensors refuses shared storage
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[path] = tensor
        return {"__tensor__": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(m in value for m in _MARKERS):
            return {k: _encode(v, tensors, f"{path}/{k}", storages) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}/#{i}k", storages),
                               _encode(v, tensors, f"{path}/#{i}", storages)]
                              for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}", storages) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}/{i}", storages) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot checkpoint {path} of type {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _write_atomically(target: Path, write) -> None:
    """`write(path)` into a temp file next to `target`, fsync it, then `os.replace` it onto `target`."""
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(handle)
    try:
        write(name)
        with open(name, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    _fsync_dir(target.parent)


def _jsonable(value: Any) -> Any:
    from sealdiff.io import to_jsonable

    return json.loads(json.dumps(to_jsonable(value), ensure_ascii=False))


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _differences(saved: dict, current: dict) -> list[str]:
    """'name: checkpoint X, now Y' for the fields that differ (one level into nested dicts like `config`)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in _differences(a, b)]
        else:
            out.append(f"{key}: checkpoint {_describe(a)}, now {_describe(b)}")
    return out


def rng_state() -> dict[str, Any]:
    """torch's global RNG state (and CUDA's, once it is in use)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(module: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """`params` of `module` by name (what a checkpoint stores of the weights)."""
    wanted = {id(p) for p in params}
    return {name: p for name, p in module.named_parameters() if id(p) in wanted}


@torch.no_grad()
def load_trainable_state(module: torch.nn.Module, params: Sequence[torch.nn.Parameter],
                         saved: dict[str, torch.Tensor]) -> None:
    current = trainable_state(module, params)
    if set(current) != set(saved):
        missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        raise SealdiffError(f"the checkpoint's weights do not fit this model (missing {missing[:3]}, "
                            f"unexpected {extra[:3]}); delete the checkpoint to start over")
    for name, p in current.items():
        if p.shape != saved[name].shape:
            raise SealdiffError(f"the checkpoint's {name} has shape {tuple(saved[name].shape)}, the model's "
                                f"{tuple(p.shape)}; delete the checkpoint to start over")
        p.copy_(saved[name])


class Interruption:
    """Turns SIGINT/SIGTERM into a flag while installed (`install`): the training loop finishes its step,
    saves a checkpoint and raises KeyboardInterrupt. A second Ctrl-C (SIGINT) raises KeyboardInterrupt at
    once; a later SIGTERM does not (launchers like `accelerate launch` follow a Ctrl-C with SIGTERM)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        logger.warning("%s: stopping after this step to save a checkpoint%s", signal.Signals(signum).name,
                       " (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else "")

    @contextlib.contextmanager
    def install(self) -> Iterator["Interruption"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread; keep the defaults
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            self._previous.clear()


class Checkpointer:
    """Checkpoints of one training run in `directory` (`<output>.checkpoint/`).

    `every` > 0 saves after every `every`-th step (0: never periodically); while `guard()` is active,
    SIGINT/SIGTERM make the loop save a checkpoint after the current step and raise KeyboardInterrupt.
    A checkpoint is one safetensors file with every tensor of the state (weights, optimizer moments,
    RNG states) plus `checkpoint.json` with the rest and the run's fingerprint (resolved config, input
    hashes); each is written to a temp file and `os.replace`d, the JSON last, so a kill at any moment
    leaves the previous checkpoint or the new one. Tensors that are not finite are never saved.

    A trainer calls `start(fingerprint)` (returns the saved state on `resume`, refusing a different
    fingerprint), then `after_step(step, state_fn)` after each step inside `with guard():`.
    """

    def __init__(self, directory: str | Path, every: int = 100, *, resume: bool = False, discard: bool = False,
                 context: dict | None = None) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise SealdiffError(f"checkpoint_every {every!r} is invalid; valid: an integer >= 0 (0 disables)")
        self.directory, self.every, self.resume = Path(directory), every, resume
        self.context = dict(context or {})
        self.fingerprint: dict | None = None
        self.saved_step: int | None = None
        self._interruption: Interruption | None = None
        self._last: tuple[int, Callable[[], dict], bool] | None = None
        if resume and not self.exists():
            raise SealdiffError(f"--resume: there is no checkpoint in {self.directory} to resume from; "
                                "run without --resume to start")
        if not resume and self.exists():
            if not discard:
                raise SealdiffError(f"a checkpoint of an interrupted run is in {self.directory}; pass --resume to "
                                    "continue it, or --overwrite (or delete it) to start over")
            logger.info("discarding the old checkpoint in %s", self.directory)
            self.remove()
        if self.exists():
            self.saved_step = self._index().get("step")

    @classmethod
    def next_to(cls, output: str | Path, every: int = 100, *, resume: bool = False, overwrite: bool = False,
                inputs: Iterable[str | Path] = (), context: dict | None = None) -> "Checkpointer":
        """The checkpointer of a run writing `output` (refuses a checkpoint folder overlapping an input)."""
        from sealdiff.io import check_not_input

        directory = checkpoint_dir(output)
        check_not_input(directory, inputs)
        return cls(directory, every, resume=resume, discard=overwrite, context=context)

    # -- files ---------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.directory / _INDEX).is_file()

    def _index(self) -> dict:
        try:
            index = json.loads((self.directory / _INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SealdiffError(f"the checkpoint {self.directory / _INDEX} cannot be read ({exc}); "
                                "delete it to start over") from None
        if not isinstance(index, dict) or index.get("format") != CHECKPOINT_FORMAT:
            raise SealdiffError(f"{self.directory / _INDEX} is not a sealdiff checkpoint of format "
                                f"{CHECKPOINT_FORMAT}; delete it to start over")
        return index

    def save(self, step: int, state: dict, reason: str = "periodic") -> Path:
        """Write `state` as the checkpoint after `step` steps; refuses NaN/inf tensors (the previous
        checkpoint stays)."""
        tensors: dict[str, torch.Tensor] = {}
        encoded = _encode(state, tensors, "state", set())
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise SealdiffError(f"{name.removeprefix('state/')} is NaN/inf after step {step}; not saving it "
                                    f"as a checkpoint{self.kept_note()}")
        from safetensors.torch import save_file

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            file = f"state-{step:08d}.safetensors"
            _write_atomically(self.directory / file, lambda path: save_file(tensors, path))
            index = {"format": CHECKPOINT_FORMAT, "step": step, "reason": reason, "tensors": file,
                     "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fingerprint": self.fingerprint,
                     "state": encoded}
            text = json.dumps(index, ensure_ascii=False, indent=1) + "\n"
            _write_atomically(self.directory / _INDEX, lambda path: Path(path).write_text(text, encoding="utf-8"))
        except OSError as exc:
            raise SealdiffError(f"could not write the checkpoint {self.directory}: {exc.strerror or exc}") from None
        self.saved_step = step
        for old in self.directory.iterdir():  # earlier states and temp files of killed saves
            if old.name not in (file, _INDEX):
                with contextlib.suppress(OSError):
                    old.unlink()
        logger.debug("checkpoint after step %d in %s", step, self.directory)
        return self.directory

    def load(self) -> tuple[int, dict, dict]:
        """(step, state, fingerprint) of the saved checkpoint."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        index = self._index()
        try:
            tensors = load_file(self.directory / index["tensors"])
            state = _decode(index["state"], tensors)
        except (OSError, KeyError, TypeError, SafetensorError) as exc:
            raise SealdiffError(f"the checkpoint in {self.directory} is incomplete or damaged ({exc}); "
                                "delete it to start over") from None
        return int(index["step"]), state, index.get("fingerprint") or {}

    def remove(self) -> None:
        """Delete the checkpoint folder (once the run's output is complete)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- the training loop's side ---------------------------------------------------------------------
    def start(self, fingerprint: dict) -> dict | None:
        """Record the run's fingerprint (the context's and `fingerprint`: resolved config, data); on resume
        return the saved state, after checking that the checkpoint was made by the same run."""
        self.fingerprint = _jsonable({**self.context, **fingerprint})
        if not self.resume:
            return None
        step, state, saved = self.load()
        differences = _differences(saved, self.fingerprint)
        if differences:
            raise SealdiffError(f"the checkpoint in {self.directory} was made with different settings "
                                f"({'; '.join(differences[:4])}); resume with the same settings, or pass "
                                "--overwrite without --resume to start over")
        self.saved_step = step
        logger.info("resuming from the checkpoint after step %d in %s", step, self.directory)
        return state

    @contextlib.contextmanager
    def guard(self) -> Iterator["Checkpointer"]:
        """While active, SIGINT/SIGTERM end the loop at the next `after_step` with a saved checkpoint and
        KeyboardInterrupt (no-op when checkpoints are disabled)."""
        if not self.every:
            yield self
            return
        self._interruption, self._last = Interruption(), None
        try:
            with self._interruption.install():
                yield self
                if self._interruption.signum is not None and self._last is not None:  # signal after the last step
                    self._stop(*self._last)
        finally:
            self._interruption = None

    @property
    def interrupted(self) -> bool:
        """Whether a signal asked this process to stop (inside `guard()`)."""
        return self._interruption is not None and self._interruption.signum is not None

    def after_step(self, step: int, state_fn: Callable[[], dict], save: bool = True, stop: bool | None = None) -> None:
        """Call after `step` steps are complete: saves when due, and on a signal saves and raises
        KeyboardInterrupt. `save=False` on processes that do not write (non-main); `stop` overrides this
        process's own signal flag (data-parallel runs agree on it so that every process stops at one step)."""
        self._last = (step, state_fn, save)
        if self.interrupted if stop is None else stop:
            self._stop(step, state_fn, save)
        if self.every and step % self.every == 0 and save:
            self.save(step, state_fn())

    def _stop(self, step: int, state_fn: Callable[[], dict], save: bool) -> None:
        if save and self.saved_step != step:
            reason = signal.Signals(self._interruption.signum).name if self.interrupted else "interrupted"
            self.save(step, state_fn(), reason=reason)
        logger.warning("interrupted after step %d: checkpoint in %s; run the same command with --resume to "
                       "continue", step, self.directory)
        raise KeyboardInterrupt

    def kept_note(self) -> str:
        """'; the last good checkpoint ... is kept in DIR' for error messages."""
        if self.saved_step is None:
            return "; no checkpoint was saved"
        return f"; the last good checkpoint (after step {self.saved_step}) is kept in {self.directory}"
