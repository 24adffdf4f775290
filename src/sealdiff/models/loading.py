"""Loading models a user hands us. They are untrusted: safetensors only unless the user opts in,
local files only, and every failure is a `SealdiffError` with one clear line.

What is checked before any library sees the directory (`load_t2i`):
- `model_index.json` is a StableDiffusionPipeline whose components are the expected diffusers /
  transformers classes (no custom code, no other libraries);
- every weight file is safetensors with a readable header, or, only with `allow_pickle=True`, a pickle
  that `torch.load(weights_only=True)` accepts and that holds a plain state dict (a pickle that would
  need any other global, i.e. could run code, is refused here, naming the file);
- sharded-weight index files only name files inside their own folder;
- each component has its config, the tokenizer its vocabulary.
After loading: every weight and buffer is finite, the components fit together (latent channels,
text width, vocabulary), and the model's native sample size is one the pipeline can produce.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from pathlib import Path

import torch

from sealdiff.errors import SealdiffError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
T2I_COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
# components of a StableDiffusionPipeline that sealdiff never loads (passed as None)
T2I_SKIPPED = ("safety_checker", "feature_extractor", "image_encoder")
# (library, allowed class names) per component; the scheduler may be any diffusers scheduler class
T2I_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL", "AutoencoderTiny")),
    "text_encoder": ("transformers", ("CLIPTextModel", "CLIPTextModelWithProjection")),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "scheduler": ("diffusers", ()),
}
CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json"}
# StableDiffusionPipeline.check_inputs requires multiples of 8 whatever the VAE
PIPELINE_SIZE_MULTIPLE = 8
MAX_MESSAGE = 300


def _one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """The first non-empty line of a library's message, shortened: our errors are one line."""
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def resolve_model(spec: str | Path) -> Path:
    """A model argument -> a local directory. `zoo:NAME` names a model of the embedded zoo."""
    text = str(spec)
    if text.startswith("zoo:"):
        from sealdiff.models import zoo

        return zoo.materialize(text[4:])
    if not text.strip():
        raise SealdiffError("the model path is empty; give a local diffusers directory or zoo:NAME")
    path = Path(text).expanduser()
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a permission denied on a parent
        raise SealdiffError(f"model path {path!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if not exists:
        raise SealdiffError(f"model path {path} does not exist (nothing is downloaded; give a local directory or zoo:NAME)")
    if not is_dir:
        raise SealdiffError(f"model path {path} is a file; expected a diffusers model directory")
    return path


def pickle_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())


def _unpickler_reason(exc: Exception) -> str:
    """The useful sentence of torch's weights_only refusal ('Unsupported global: GLOBAL exec ...')."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
        text = text.split(" Please use", 1)[0]
    return _one_line(text)


def check_pickle_file(file: Path, state_dict: bool = True) -> None:
    """Load `file` with `torch.load(weights_only=True)`: refuses any global outside torch's tensor
    allowlist (so nothing can run), and (`state_dict`) anything that is not a {name: tensor} dict."""
    try:
        mmap = zipfile.is_zipfile(file)
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ... : all mean "refuse"
        raise SealdiffError(f"refusing {file}: torch.load(weights_only=True) rejects it "
                            f"({exc.__class__.__name__}: {_unpickler_reason(exc)})") from None
    if state_dict and not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in state.items())):
        raise SealdiffError(f"refusing {file}: it does not hold a plain state dict of tensors")
    del state


def _check_shard_index(index: Path, allow_pickle: bool) -> None:
    """A `*.index.json` may only name weight files inside its own folder (no paths, no '..')."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise SealdiffError(f"{index} is not a valid sharded-weights index") from None
    for name in sorted(map(str, names)):
        if Path(name).name != name or name in (".", ".."):
            raise SealdiffError(f"{index} names the weight file {name!r} outside its folder; refusing")
        file = index.parent / name
        if not file.is_file():
            raise SealdiffError(f"{index} names {name}, which does not exist")
        if not name.endswith(".safetensors") and not allow_pickle:
            raise SealdiffError(f"refusing pickle-based weights {file} named by {index.name} (loading them can run "
                                "arbitrary code); convert to safetensors, or pass --allow-pickle")


def check_weights(directory: Path, components: tuple[str, ...], allow_pickle: bool = False) -> None:
    """Refuse pickled weights (they can run code when loaded) unless allowed, and then accept only
    those that `torch.load(weights_only=True)` loads as a state dict; refuse damaged safetensors files."""
    from safetensors import safe_open

    pickles = pickle_files(directory)
    if pickles and not allow_pickle:
        raise SealdiffError(f"refusing pickle-based weights {pickles[0]} (loading them can run arbitrary code); "
                            "convert to safetensors, or pass --allow-pickle to load with torch weights_only=True")
    for file in pickles:  # weights of a component must be a state dict; any other pickle must merely be safe
        check_pickle_file(file, state_dict=file.relative_to(directory).parts[0] in components)
    for component in components:
        folder = directory / component
        if component in ("tokenizer", "scheduler"):
            continue
        for index in sorted(folder.glob("*.index.json")):
            _check_shard_index(index, allow_pickle)
        tensors = sorted(folder.glob("*.safetensors"))
        if not tensors and not (allow_pickle and pickle_files(folder)):
            hint = " (it holds pickle-based weights: pass --allow-pickle)" if pickle_files(folder) else ""
            raise SealdiffError(f"{folder} has no .safetensors weights{hint}")
        for file in tensors:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        handle.get_slice(key).get_shape()
            except Exception as exc:  # safetensors raises several types for damaged headers
                raise SealdiffError(f"{file} is not a valid safetensors file "
                                    f"({exc.__class__.__name__}: {_one_line(exc)})") from None


def read_model_index(directory: Path) -> dict:
    index = directory / "model_index.json"
    if not index.is_file():
        raise SealdiffError(f"{directory} is not a diffusers pipeline directory (no model_index.json)")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SealdiffError(f"{index} is not a valid model_index.json") from None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise SealdiffError(f"{index} is not a valid model_index.json (no _class_name)")
    return data


def model_type(directory: Path) -> str:
    return read_model_index(directory)["_class_name"]


def check_components(directory: Path, index: dict) -> None:
    """Every component `model_index.json` names must be an expected diffusers/transformers class:
    no custom code (`library.py` inside the folder) and no other library is ever imported."""
    import diffusers

    path = directory / "model_index.json"
    for name, (library, classes) in T2I_CLASSES.items():
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise SealdiffError(f"{path}: component {name!r} must be [library, class], got {entry!r}")
        lib, cls = entry
        if name == "scheduler":
            scheduler = getattr(diffusers, cls, None) if cls.isidentifier() else None
            ok = lib == library and isinstance(scheduler, type) and issubclass(scheduler, diffusers.SchedulerMixin)
        else:
            ok = lib == library and cls in classes
        if not ok:
            valid = f"a {library} scheduler class" if name == "scheduler" else \
                " or ".join(f"[{library!r}, {c!r}]" for c in classes)
            raise SealdiffError(f"{path}: component {name!r} is {entry!r}; valid: {valid}")
    for name, entry in index.items():
        if name.startswith("_") or name in T2I_CLASSES or name in T2I_SKIPPED:
            continue
        if isinstance(entry, list) and any(e is not None for e in entry):
            raise SealdiffError(f"{path}: unexpected component {name!r} = {entry!r}; "
                                f"valid components: {', '.join(T2I_CLASSES)}")


def check_files(directory: Path) -> None:
    """Configs and tokenizer vocabulary present (libraries otherwise fail obscurely, or worse: a CLIP
    tokenizer without its vocabulary loads silently and maps every word to one id)."""
    missing = [c for c in T2I_COMPONENTS if not (directory / c).is_dir()]
    if missing:
        raise SealdiffError(f"{directory} lacks the pipeline components {missing}")
    for component, name in CONFIG_FILES.items():
        config = directory / component / name
        if not config.is_file():
            raise SealdiffError(f"{config} is missing")
    tokenizer = directory / "tokenizer"
    if not ((tokenizer / "tokenizer.json").is_file()
            or ((tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file())):
        raise SealdiffError(f"{tokenizer} has no vocabulary (tokenizer.json, or vocab.json and merges.txt)")


def _library_error(directory: Path, exc: Exception) -> SealdiffError:
    return SealdiffError(f"could not load {directory}: {exc.__class__.__name__}: {_one_line(exc)}")


def _load_model(directory: Path, component: str, class_name: str, dtype: torch.dtype, allow_pickle: bool):
    """One weighted component, loaded by its (allowlisted) class; refused when the checkpoint leaves any
    weight uninitialised (diffusers would leave it on the meta device, transformers would draw it at random)."""
    import diffusers
    import transformers

    library = diffusers if T2I_CLASSES[component][0] == "diffusers" else transformers
    cls = getattr(library, class_name)
    try:
        model, info = cls.from_pretrained(directory / component, dtype=dtype, local_files_only=True,
                                          use_safetensors=None if allow_pickle else True, output_loading_info=True)
    except Exception as exc:  # an untrusted directory can make the libraries raise nearly anything
        raise _library_error(directory / component, exc) from None
    missing = sorted(map(str, info.get("missing_keys") or ()))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SealdiffError(f"{directory / component}: the checkpoint lacks the weights {missing[:3]}{more}")
    return model


def require_t2i(directory: Path) -> dict:
    """The model index of a text-to-image `StableDiffusionPipeline` directory; any other pipeline is refused (an
    unconditional one with the commands that take it)."""
    from sealdiff.models.uncond import KIND_OF_PIPELINE

    index = read_model_index(directory)
    kind = index["_class_name"]
    if kind != "StableDiffusionPipeline":
        hint = ("; unconditional models go through `sealdiff generate`, `sealdiff eval`, `sealdiff scan`, `sealdiff "
                "remove --method elijah|diff-cleanse|diffdefend` and `sealdiff report`") if kind in KIND_OF_PIPELINE else ""
        raise SealdiffError(f"{directory} holds a {kind}; this command needs a text-to-image StableDiffusionPipeline"
                            + hint)
    return index


DEVICE_CHOICES = "auto, cpu, or an accelerator torch sees (cuda, cuda:N, ...)"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device a command runs its models on: 'auto' (None) is the accelerator torch sees (CUDA, XPU, MPS, ...)
    or else the CPU; any other name must be the CPU or a device of that accelerator (e.g. 'cuda:1' needs two)."""
    if spec is None or str(spec).strip().lower() == "auto":
        found = torch.accelerator.current_accelerator(check_available=True)
        return torch.device(found) if found is not None else torch.device("cpu")
    try:
        device = torch.device(str(spec).strip().lower())
    except RuntimeError:
        raise SealdiffError(f"device {str(spec)!r} is invalid; valid: {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    found = torch.accelerator.current_accelerator(check_available=True)
    count = torch.accelerator.device_count() if found is not None else 0
    if found is None or found.type != device.type or (device.index or 0) >= count:
        seen = f"{count} {found.type} device(s)" if found is not None else "no accelerator"
        raise SealdiffError(f"device {str(spec)!r} is not available here (torch sees {seen}); valid: {DEVICE_CHOICES}")
    return device


def load_t2i(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             allow_pickle: bool = False):
    """Load a text-to-image `StableDiffusionPipeline` directory (SD 1.x/2.x layout or the tiny zoo)."""
    from diffusers import StableDiffusionPipeline

    directory = resolve_model(spec)
    index = require_t2i(directory)
    try:
        check_files(directory)
        check_components(directory, index)
        check_weights(directory, T2I_COMPONENTS, allow_pickle)
    except OSError as exc:  # an unreadable file or folder inside the model
        raise SealdiffError(f"cannot read {exc.filename or directory}: {exc.strerror or exc}") from None
    # use_safetensors=None prefers safetensors and falls back to the pickles checked above; diffusers and
    # transformers load those with torch.load(weights_only=True) as well.
    models = {name: _load_model(directory, name, index[name][1], dtype, allow_pickle)
              for name in ("unet", "vae", "text_encoder")}
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            directory, **models, dtype=dtype, use_safetensors=None if allow_pickle else True, local_files_only=True,
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
            trust_remote_code=False)
    except Exception as exc:
        raise _library_error(directory, exc) from None
    for name in ("unet", "vae", "text_encoder"):
        check_finite(getattr(pipe, name), directory / name)
    check_compatible(pipe, directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_finite(module: torch.nn.Module, where: Path) -> None:
    """Every floating-point weight and buffer of `module` is finite (no NaN or inf)."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, tensor in tensors:
        if tensor.is_meta:
            raise SealdiffError(f"{where}: weight {name} was not loaded (missing from the checkpoint)")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SealdiffError(f"{where}: weight {name} contains NaN or inf")


def native_size(pipe) -> int:
    """The image side the pipeline generates by default (UNet sample size x VAE factor)."""
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return size * pipe.vae_scale_factor


def check_sample_size(pipe, height: int, width: int) -> None:
    """Refuse an image size the pipeline cannot produce (before any compute).

    Valid: positive multiples of lcm(8, VAE factor) (StableDiffusionPipeline insists on 8, the VAE on
    its own factor). The message names the valid sizes and the model's native size."""
    multiple = math.lcm(PIPELINE_SIZE_MULTIPLE, int(pipe.vae_scale_factor))
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
            try:
                native = f"; this model's native size is {native_size(pipe)}"
            except Exception:
                native = ""
            raise SealdiffError(f"{name}={value!r} cannot be produced by this model; valid: positive multiples of "
                                f"{multiple}{native}")


def check_compatible(pipe, directory: Path) -> None:
    """The components fit together, so that generation cannot fail later with a shape error."""
    unet, vae, text_encoder, tokenizer = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config, pipe.tokenizer
    latent = vae.latent_channels
    if unet.in_channels != latent or unet.out_channels not in (latent, 2 * latent):
        raise SealdiffError(f"{directory}: the UNet takes {unet.in_channels} channels and returns {unet.out_channels}, "
                            f"but the VAE's latents have {latent}")
    cross = unet.cross_attention_dim
    widths = set(cross) if isinstance(cross, (list, tuple)) else {cross}
    if widths != {text_encoder.hidden_size}:
        raise SealdiffError(f"{directory}: the UNet attends to text of width {cross}, but the text encoder "
                            f"produces {text_encoder.hidden_size}")
    if len(tokenizer) > text_encoder.vocab_size:
        raise SealdiffError(f"{directory}: the tokenizer has {len(tokenizer)} tokens, more than the text encoder's "
                            f"vocabulary of {text_encoder.vocab_size}")
    ids = tokenizer("a photo of a cat", add_special_tokens=False).input_ids
    if not ids or (tokenizer.unk_token_id is not None and all(i == tokenizer.unk_token_id for i in ids)):
        raise SealdiffError(f"{directory}/tokenizer maps ordinary words to its unknown token (a broken vocabulary)")
    size, multiple = native_size(pipe), math.lcm(PIPELINE_SIZE_MULTIPLE, int(pipe.vae_scale_factor))
    if size < multiple or size % multiple:
        raise SealdiffError(f"{directory}: the model's native image size {size} (UNet sample_size "
                            f"{unet.sample_size} x VAE factor {pipe.vae_scale_factor}) cannot be generated; "
                            f"valid: positive multiples of {multiple}")
