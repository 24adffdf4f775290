"""Loading models a user hands us. They are untrusted: safetensors only unless the user opts in,
local files only, and every failure is a `SealdiffError` with one clear line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sealdiff.errors import SealdiffError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
T2I_COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")


def resolve_model(spec: str | Path) -> Path:
    """A model argument -> a local directory. `zoo:NAME` names a model of the embedded zoo."""
    text = str(spec)
    if text.startswith("zoo:"):
        from sealdiff.models import zoo

        return zoo.materialize(text[4:])
    path = Path(text).expanduser()
    if not path.exists():
        raise SealdiffError(f"model path {path} does not exist (nothing is downloaded; give a local directory or zoo:NAME)")
    if not path.is_dir():
        raise SealdiffError(f"model path {path} is a file; expected a diffusers model directory")
    return path


def pickle_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file())


def check_weights(directory: Path, components: tuple[str, ...], allow_pickle: bool = False) -> None:
    """Refuse pickled weights (they can run code when loaded) and truncated safetensors files."""
    from safetensors import safe_open

    pickles = pickle_files(directory)
    if pickles and not allow_pickle:
        raise SealdiffError(f"refusing pickle-based weights {pickles[0]} (loading them can run arbitrary code); "
                            "convert to safetensors, or pass --allow-pickle to load with torch weights_only=True")
    for component in components:
        folder = directory / component
        if component in ("tokenizer", "scheduler"):
            continue
        tensors = sorted(folder.glob("*.safetensors"))
        if not tensors and not (allow_pickle and pickle_files(folder)):
            raise SealdiffError(f"{folder} has no .safetensors weights")
        for file in tensors:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            except Exception as exc:  # safetensors raises several types for damaged headers
                raise SealdiffError(f"{file} is not a valid safetensors file ({exc.__class__.__name__}: {exc})") from None


def model_type(directory: Path) -> str:
    index = directory / "model_index.json"
    if not index.is_file():
        raise SealdiffError(f"{directory} is not a diffusers pipeline directory (no model_index.json)")
    try:
        return json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise SealdiffError(f"{index} is not a valid model_index.json") from None


def load_t2i(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             allow_pickle: bool = False):
    """Load a text-to-image `StableDiffusionPipeline` directory (SD 1.x/2.x layout or the tiny zoo)."""
    from diffusers import StableDiffusionPipeline

    directory = resolve_model(spec)
    kind = model_type(directory)
    if kind not in ("StableDiffusionPipeline",):
        raise SealdiffError(f"{directory} holds a {kind}; this command needs a text-to-image StableDiffusionPipeline")
    missing = [c for c in T2I_COMPONENTS if not (directory / c).is_dir()]
    if missing:
        raise SealdiffError(f"{directory} lacks the pipeline components {missing}")
    check_weights(directory, T2I_COMPONENTS, allow_pickle)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            directory, dtype=dtype, use_safetensors=not allow_pickle, local_files_only=True,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise SealdiffError(f"could not load {directory}: {str(exc).splitlines()[0]}") from None
    check_finite(pipe.unet, directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_finite(module: torch.nn.Module, where: Path) -> None:
    for name, param in module.named_parameters():
        if not torch.isfinite(param).all():
            raise SealdiffError(f"{where}: weight {name} contains NaN or inf")
