"""Utility of a text-to-image model: agreement with a reference model on the same prompts and seeds
(SSIM, MSE, LPIPS), distribution distance (Fréchet distance over the toy judge's features, or over a
local feature extractor's), and caption fidelity (CLIP score from a local CLIP directory).

Images are float tensors (N, 3, H, W) in [0, 1]. Nothing is downloaded: a metric that needs weights
is computed only when a local path is given, and is otherwise reported as absent (`Metric.absent`,
value None with a reason), never as 0. A path that is given but missing is a `SealdiffError`.

Formulas
- SSIM: Wang et al. 2004 with a Gaussian window (11 taps, sigma 1.5; shrunk to the largest odd size that
  fits smaller images), K1=0.01, K2=0.03, data range 1, 'valid' convolution per channel; the per-image
  value is the mean of the SSIM map over channels and positions.
- MSE: mean squared difference per image.
- Fréchet distance: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((sqrt(S1) S2 sqrt(S1))^1/2), in float64, matrix
  square roots of symmetric PSD matrices by eigendecomposition (negative eigenvalues clamped to 0).
- CLIP score: 100 * max(cos(image embedding, text embedding), 0) per image (the torchmetrics convention).
- LPIPS: the AlexNet variant of Zhang et al. 2018 (lpips 0.1), images upsampled to at least 64x64.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sealdiff.errors import SealdiffError

logger = logging.getLogger(__name__)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Metric:
    """A measured number, or an absent one (value None) with the reason it could not be measured."""

    value: float | None
    reason: str | None = None
    source: str | None = None  # what computed it (feature extractor, weights path)

    @classmethod
    def absent(cls, reason: str) -> "Metric":
        return cls(value=None, reason=reason)

    @property
    def present(self) -> bool:
        return self.value is not None


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two (N, C, H, W) image sets of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image pair, (N,)."""
    _check_pair(a, b)
    return (a.double() - b.double()).pow(2).mean(dim=(1, 2, 3)).to(a.dtype)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian window (size, size), float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
         data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image pair, (N,); 1 for identical images."""
    _check_pair(a, b)
    n, c, h, w = a.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd
    kernel = gaussian_window(size, sigma).expand(c, 1, size, size).contiguous()
    x, y = a.double(), b.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).to(a.dtype)


# ---------------------------------------------------------------------------------------------- Fréchet


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigh; tiny negative eigenvalues -> 0)."""
    sym = (matrix + matrix.T) / 2
    values, vectors = torch.linalg.eigh(sym)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of (N, D) features, float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got {tuple(features.shape)}")
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """Fréchet distance between Gaussians N(mu1, s1) and N(mu2, s2)."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    root1 = sqrtm_psd(s1)
    cross = sqrtm_psd(root1 @ s2 @ root1)
    value = (mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross.trace()
    return max(0.0, float(value))


def features_fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


@torch.no_grad()
def toy_fid(judge, images_a: torch.Tensor, images_b: torch.Tensor, batch_size: int = 256) -> float:
    """Fréchet distance between two image sets over the toy judge's penultimate features (a toy-world FID)."""
    def feats(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([judge.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])

    return features_fid(feats(images_a), feats(images_b))


# ---------------------------------------------------------------------------------------------- local weights


def require_path(path: str | Path, what: str, flag: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise SealdiffError(f"{what} path {path} does not exist (nothing is downloaded; give a local path with {flag})")
    return path


def path_sha256(path: str | Path) -> str:
    """sha256 of a file, or `directory_sha256` of a directory."""
    from sealdiff.io import directory_sha256

    path = Path(path)
    if path.is_dir():
        return directory_sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_safetensors_dir(directory: Path, what: str, flag: str) -> None:
    from sealdiff.models.loading import pickle_files

    if not directory.is_dir():
        raise SealdiffError(f"{what} path {directory} is not a directory; expected a transformers model directory ({flag})")
    if not (directory / "config.json").is_file():
        raise SealdiffError(f"{what} directory {directory} has no config.json")
    if not list(directory.glob("*.safetensors")):
        pickles = pickle_files(directory)
        extra = f" (found pickle weights {pickles[0].name}; convert them to safetensors)" if pickles else ""
        raise SealdiffError(f"{what} directory {directory} has no .safetensors weights{extra}")


@dataclass(frozen=True)
class Preprocess:
    """CLIP-style preprocessing read from a local preprocessor_config.json, done in torch."""

    resize: int | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_directory(cls, directory: Path, default_size: int) -> "Preprocess":
        file = directory / "preprocessor_config.json"
        config = json.loads(file.read_text()) if file.is_file() else {}
        size = config.get("size", default_size)
        if isinstance(size, dict):
            size = size.get("shortest_edge") or size.get("height") or default_size
        crop = config.get("crop_size", size)
        if isinstance(crop, dict):
            crop = (int(crop.get("height", size)), int(crop.get("width", size)))
        else:
            crop = (int(crop), int(crop))
        normalize = config.get("do_normalize", True)
        return cls(resize=int(size) if config.get("do_resize", True) else None,
                   crop=crop if config.get("do_center_crop", True) else None,
                   mean=tuple(config.get("image_mean", CLIP_MEAN)) if normalize else (0.0, 0.0, 0.0),
                   std=tuple(config.get("image_std", CLIP_STD)) if normalize else (1.0, 1.0, 1.0))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.resize:
            h, w = x.shape[-2:]
            scale = self.resize / min(h, w)
            x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bicubic",
                              antialias=True, align_corners=False).clamp(0, 1)
        if self.crop:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            top, left = max(0, (h - ch) // 2), max(0, (w - cw) // 2)
            x = x[..., top:top + ch, left:left + cw]
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def _pooled(output) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.pooler_output


@dataclass
class LocalClip:
    model: object
    tokenizer: object
    preprocess: Preprocess
    path: Path


def load_clip(clip_dir: str | Path) -> LocalClip:
    """A transformers `CLIPModel` and its tokenizer from a local directory (safetensors only, no download)."""
    from transformers import AutoTokenizer, CLIPModel

    directory = require_path(clip_dir, "CLIP", "--clip")
    _check_safetensors_dir(directory, "CLIP", "--clip")
    try:
        model = CLIPModel.from_pretrained(directory, local_files_only=True, use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SealdiffError(f"could not load CLIP from {directory}: {str(exc).splitlines()[0]}") from None
    preprocess = Preprocess.from_directory(directory, model.config.vision_config.image_size)
    return LocalClip(model, tokenizer, preprocess, directory)


@torch.no_grad()
def clip_cosine(images: torch.Tensor, prompts: Sequence[str], clip_dir: str | Path | LocalClip,
                batch_size: int = 64) -> torch.Tensor:
    """Cosine similarity of CLIP image and prompt embeddings per image, (N,), from a local CLIP directory."""
    if len(images) != len(prompts):
        raise ValueError("one prompt per image")
    clip = clip_dir if isinstance(clip_dir, LocalClip) else load_clip(clip_dir)
    max_length = min(clip.tokenizer.model_max_length, clip.model.config.text_config.max_position_embeddings)
    out = []
    for start in range(0, len(images), batch_size):
        text = clip.tokenizer(list(prompts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
        text_emb = _pooled(clip.model.get_text_features(input_ids=text["input_ids"],
                                                        attention_mask=text["attention_mask"]))
        image_emb = _pooled(clip.model.get_image_features(pixel_values=clip.preprocess(images[start:start + batch_size])))
        out.append(F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1))
    return torch.cat(out)


def clip_score(images: torch.Tensor, prompts: Sequence[str], clip_dir: str | Path | LocalClip,
               batch_size: int = 64) -> torch.Tensor:
    """CLIP score per image, (N,): 100 * max(cos(image, prompt), 0), with CLIP weights from a local directory."""
    return 100 * clip_cosine(images, prompts, clip_dir, batch_size).clamp_min(0)


# ---------------------------------------------------------------------------------------------- FID (local extractor)


@torch.no_grad()
def extractor_features(images: torch.Tensor, extractor_dir: str | Path, batch_size: int = 64) -> torch.Tensor:
    """Pooled image features from a local transformers vision model (a CLIPModel uses its image embedding)."""
    from transformers import AutoModel

    directory = require_path(extractor_dir, "FID feature extractor", "--fid-features")
    _check_safetensors_dir(directory, "FID feature extractor", "--fid-features")
    try:
        model = AutoModel.from_pretrained(directory, local_files_only=True, use_safetensors=True).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SealdiffError(f"could not load the feature extractor {directory}: {str(exc).splitlines()[0]}") from None
    config = getattr(model.config, "vision_config", model.config)
    preprocess = Preprocess.from_directory(directory, int(getattr(config, "image_size", 224)))
    out = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess(images[start:start + batch_size])
        if hasattr(model, "get_image_features"):
            feats = _pooled(model.get_image_features(pixel_values=pixels))
        else:
            result = model(pixel_values=pixels)
            feats = result.pooler_output if getattr(result, "pooler_output", None) is not None \
                else result.last_hidden_state.mean(dim=1)
        out.append(feats.flatten(1).float())
    return torch.cat(out)


def extractor_fid(images_a: torch.Tensor, images_b: torch.Tensor, extractor_dir: str | Path) -> float:
    """FID over a local feature extractor's pooled features (Inception only if the weights are Inception)."""
    return features_fid(extractor_features(images_a, extractor_dir), extractor_features(images_b, extractor_dir))


# ---------------------------------------------------------------------------------------------- LPIPS

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
LPIPS_MIN_SIDE = 64
ALEX_CONVS = {0: (3, 64, 11, 4, 2), 3: (64, 192, 5, 1, 2), 6: (192, 384, 3, 1, 1), 8: (384, 256, 3, 1, 1),
              10: (256, 256, 3, 1, 1)}


class LPIPS(nn.Module):
    """LPIPS (AlexNet, lpips 0.1). Weights: one safetensors file with torchvision AlexNet keys
    `features.{0,3,6,8,10}.{weight,bias}` and lpips keys `lin{0..4}.model.1.weight` (convert the lpips
    package's alex.pth and torchvision's alexnet weights once with `safetensors.torch.save_file`)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.ModuleDict({str(i): nn.Conv2d(cin, cout, k, stride=s, padding=p)
                                       for i, (cin, cout, k, s, p) in ALEX_CONVS.items()})
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        with torch.no_grad():  # trained LPIPS weights are non-negative (a distance); so is the random init
            for lin in self.lins:
                lin.weight.abs_()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features
        x = (x - self.shift) / self.scale
        r1 = F.relu(f["0"](x))
        r2 = F.relu(f["3"](F.max_pool2d(r1, 3, 2)))
        r3 = F.relu(f["6"](F.max_pool2d(r2, 3, 2)))
        r4 = F.relu(f["8"](r3))
        r5 = F.relu(f["10"](r4))
        return [r1, r2, r3, r4, r5]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image pair, (N,); a and b in [0, 1]."""
        _check_pair(a, b)
        side = min(a.shape[-2:])
        if side < LPIPS_MIN_SIDE:
            size = [math.ceil(s * LPIPS_MIN_SIDE / side) for s in a.shape[-2:]]
            a, b = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (a, b))
        total = torch.zeros(a.shape[0])
        for lin, fa, fb in zip(self.lins, self.taps(a * 2 - 1), self.taps(b * 2 - 1)):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total

    def state_for_file(self) -> dict[str, torch.Tensor]:
        """This module's weights under the file's key names (for tests and conversions)."""
        out = {f"features.{i}.{p}": getattr(conv, p) for i, conv in self.features.items() for p in ("weight", "bias")}
        out.update({f"lin{k}.model.1.weight": lin.weight for k, lin in enumerate(self.lins)})
        return {k: v.detach().contiguous() for k, v in out.items()}

    @classmethod
    def load(cls, path: str | Path) -> "LPIPS":
        from safetensors.torch import load_file

        path = require_path(path, "LPIPS weights", "--lpips")
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise SealdiffError(f"LPIPS directory {path} must hold exactly one .safetensors file, found {len(files)}")
            path = files[0]
        if path.suffix != ".safetensors":
            raise SealdiffError(f"LPIPS weights {path} must be a .safetensors file (pickle weights are refused)")
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise SealdiffError(f"{path} is not a valid safetensors file ({exc.__class__.__name__})") from None
        module = cls()
        expected = module.state_for_file()
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise SealdiffError(f"LPIPS weights {path} lack {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        with torch.no_grad():
            for i, conv in module.features.items():
                conv.weight.copy_(tensors[f"features.{i}.weight"])
                conv.bias.copy_(tensors[f"features.{i}.bias"])
            for k, lin in enumerate(module.lins):
                lin.weight.copy_(tensors[f"lin{k}.model.1.weight"].view_as(lin.weight))
        return module.eval()


@torch.no_grad()
def lpips(a: torch.Tensor, b: torch.Tensor, weights: str | Path | LPIPS, batch_size: int = 64) -> torch.Tensor:
    """LPIPS per image pair, (N,), with weights from a local safetensors file."""
    model = weights if isinstance(weights, LPIPS) else LPIPS.load(weights)
    return torch.cat([model(a[i:i + batch_size], b[i:i + batch_size]) for i in range(0, len(a), batch_size)])
