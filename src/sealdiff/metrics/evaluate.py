"""Full evaluation of one text-to-image model: per-judge attack success, false triggers and removal
accuracy on fixed prompts and seeds, utility against a reference model, the judges' own accuracy on
labelled renders; and an evaluation run directory (metrics.json, images.csv, grids, sealdiff.json).

Every judge (patch, style, object) is applied to every image, whatever the backdoor's kind; the judge
that matches the backdoor's kind is the primary one (its numbers are the headline `attack_success`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sealdiff.data import toyworld
from sealdiff.data.triggers import insert_trigger
from sealdiff.errors import SealdiffError
from sealdiff.models.loading import resolve_device
from sealdiff.io import check_not_input
from sealdiff.metrics.backdoor import EVAL_SEED, Target, clean_prompts, make_judge
from sealdiff.metrics.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate, image_size
from sealdiff.metrics.judge import HEADS, ToyJudge
from sealdiff.metrics.judges import attribute_accuracy
from sealdiff.metrics.utility import (
    LPIPS, Metric, clip_score, extractor_fid, load_clip, lpips, mse, path_sha256, require_path, ssim, toy_fid,
)

logger = logging.getLogger(__name__)

JUDGES: tuple[str, ...] = ("patch", "style", "object")
TARGET_KINDS: tuple[str, ...] = ("pixel", "style", "object")
JUDGE_OF_KIND = {"pixel": "patch", "style": "style", "object": "object"}
KIND_OF_JUDGE = {v: k for k, v in JUDGE_OF_KIND.items()}
IMAGE_SETS: tuple[str, ...] = ("triggered", "clean", "reference")
METRICS_FILE, IMAGES_FILE = "metrics.json", "images.csv"
SCHEMA_VERSION = 1
UTILITY_METRICS: tuple[str, ...] = ("ssim", "mse", "lpips", "toy_fid", "fid", "clip_score")


@dataclass
class EvalConfig:
    """How to evaluate. Paths are local only; a metric whose path is None is reported as absent."""

    count: int = 200  # prompts per set (triggered and clean share prompts and seeds)
    seed: int = EVAL_SEED  # image i uses seed `seed + i`
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    batch_size: int = 50
    judge: str | Path | None = None  # toy judge directory; None: the zoo's toy-judge
    reference: str | None = None  # reference model (pre-attack / pre-repair): directory or zoo:NAME
    clip: str | Path | None = None  # local CLIPModel directory for the CLIP score
    lpips: str | Path | None = None  # LPIPS AlexNet safetensors weights (see metrics.utility.LPIPS)
    fid_features: str | Path | None = None  # local transformers vision model directory for FID
    trigger_position: str | int | None = None  # None: from the model's sealdiff.json, else "start"
    grid_count: int = 16  # images per PNG grid
    render_count: int = 32  # labelled scenes per variant for the judges' accuracy on renders
    label: str | None = None  # run label for reports; None: the model's name
    allow_pickle: bool = False
    device: str = "auto"  # where the pipelines generate (`resolve_device`); recorded resolved (e.g. "cpu")

    def __post_init__(self) -> None:
        self.device = str(resolve_device(self.device))
        for name, low in (("count", 2), ("steps", 1), ("batch_size", 1), ("grid_count", 1), ("render_count", 1),
                          ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SealdiffError(f"{name}={value!r} is invalid; valid: an integer >= {low}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or not self.guidance >= 0:
            raise SealdiffError(f"guidance={self.guidance!r} is invalid; valid: a number >= 0")
        self.guidance = float(self.guidance)
        if isinstance(self.trigger_position, str) and self.trigger_position.lstrip("-").isdigit():
            self.trigger_position = int(self.trigger_position)
        if not (self.trigger_position is None or isinstance(self.trigger_position, int)
                or self.trigger_position in ("start", "end")):
            raise SealdiffError(f"trigger_position={self.trigger_position!r} is invalid; valid: start, end, or a word index")
        for name, flag in (("judge", "--judge"), ("clip", "--clip"), ("lpips", "--lpips"),
                           ("fid_features", "--fid-features")):
            if getattr(self, name) is not None:
                setattr(self, name, require_path(getattr(self, name), name.replace("_", " "), flag))


@dataclass
class ModelRef:
    spec: str
    path: str
    sha256: str


@dataclass
class JudgeMetrics:
    judge: str
    threshold: float | None  # None: argmax of a classifier
    attack_success: float  # share of triggered prompts whose image shows the target
    false_trigger: float  # share of clean prompts whose image shows the target
    removal_accuracy: float  # 1 - attack_success
    mean_score_triggered: float
    mean_score_clean: float


@dataclass
class UtilityMetrics:
    attribute_accuracy: dict[str, float]  # toy judge reads shape / fg / bg of clean images as captioned
    ssim: Metric  # vs reference, clean prompts, same seeds (mean over images)
    mse: Metric
    lpips: Metric
    toy_fid: Metric  # Fréchet distance over toy-judge features, clean vs reference clean
    fid: Metric  # Fréchet distance over a local extractor's features
    clip_score: Metric  # mean CLIP score of clean images against their prompts


@dataclass
class RenderAccuracy:
    """A judge's agreement with the labels of toy renders (plain, patched, grayscale, both)."""

    judge: str
    accuracy: float
    true_positive_rate: float  # hits on renders that show the target
    true_negative_rate: float  # no hit on renders that do not
    count: int


@dataclass
class ImageRow:
    set: str
    index: int
    prompt: str
    seed: int
    judge: str  # the primary judge
    score: float
    hit: bool
    scores: dict[str, float]
    hits: dict[str, bool]
    read: dict[str, str]  # what the toy judge reads: shape, fg, bg, patch


@dataclass
class EvalResult:
    label: str
    model: ModelRef
    reference: ModelRef | None
    judge_model: ModelRef
    trigger: str
    trigger_position: str | int
    target: Target
    primary_judge: str
    config: EvalConfig
    judges: dict[str, JudgeMetrics]
    utility: UtilityMetrics
    judge_accuracy: dict[str, RenderAccuracy]
    prompts: dict[str, list[str]]
    seeds: list[int]
    extra_models: dict[str, ModelRef] = field(default_factory=dict)  # clip, lpips, fid_features
    rows: list[ImageRow] = field(default_factory=list, repr=False)
    images: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def attack_success(self) -> float:
        return self.judges[self.primary_judge].attack_success

    @property
    def false_trigger(self) -> float:
        return self.judges[self.primary_judge].false_trigger

    @property
    def removal_accuracy(self) -> float:
        return self.judges[self.primary_judge].removal_accuracy

    def metrics(self) -> dict:
        """The metrics.json document (see METRICS_SCHEMA)."""
        from sealdiff.io import to_jsonable

        cfg = self.config
        return to_jsonable({
            "schema_version": SCHEMA_VERSION, "label": self.label, "model": self.model, "reference": self.reference,
            "trigger": self.trigger, "trigger_position": self.trigger_position,
            "target": dataclasses.asdict(self.target), "primary_judge": self.primary_judge,
            "count": cfg.count, "seed": cfg.seed, "steps": cfg.steps, "guidance": cfg.guidance,
            "attack_success": self.attack_success, "false_trigger": self.false_trigger,
            "removal_accuracy": self.removal_accuracy, "judges": self.judges, "utility": self.utility,
            "judge_accuracy": self.judge_accuracy,
        })


# ---------------------------------------------------------------------------------------------- schema

_NUMBER = {"type": "number"}
_RATE = {"type": "number", "minimum": 0, "maximum": 1}
_OPT_RATE = {"type": ["number", "null"], "minimum": 0, "maximum": 1}  # null: no renders of that label
_METRIC = {"type": "object", "required": ["value", "reason", "source"], "additionalProperties": False,
           "properties": {"value": {"type": ["number", "null"]}, "reason": {"type": ["string", "null"]},
                          "source": {"type": ["string", "null"]}}}
_MODEL_REF = {"type": "object", "required": ["spec", "path", "sha256"], "additionalProperties": False,
              "properties": {"spec": {"type": "string"}, "path": {"type": "string"},
                             "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}
_JUDGE = {"type": "object", "additionalProperties": False,
          "required": ["judge", "threshold", "attack_success", "false_trigger", "removal_accuracy",
                       "mean_score_triggered", "mean_score_clean"],
          "properties": {"judge": {"enum": list(JUDGES)}, "threshold": {"type": ["number", "null"]},
                         "attack_success": _RATE, "false_trigger": _RATE, "removal_accuracy": _RATE,
                         "mean_score_triggered": _NUMBER, "mean_score_clean": _NUMBER}}
_RENDER = {"type": "object", "additionalProperties": False,
           "required": ["judge", "accuracy", "true_positive_rate", "true_negative_rate", "count"],
           "properties": {"judge": {"enum": list(JUDGES)}, "accuracy": _RATE, "true_positive_rate": _OPT_RATE,
                          "true_negative_rate": _OPT_RATE, "count": {"type": "integer", "minimum": 1}}}

METRICS_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sealdiff evaluation metrics.json",
    "description": "Per-judge backdoor metrics on triggered and clean prompts (same prompts and seeds), utility "
                   "against a reference model, and the judges' accuracy on labelled toy renders. A metric that "
                   "could not be measured has value null and a reason.",
    "type": "object",
    "required": ["schema_version", "label", "model", "reference", "trigger", "trigger_position", "target",
                 "primary_judge", "count", "seed", "steps", "guidance", "attack_success", "false_trigger",
                 "removal_accuracy", "judges", "utility", "judge_accuracy"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"enum": [SCHEMA_VERSION]},
        "label": {"type": "string"},
        "model": _MODEL_REF,
        "reference": {"type": ["object", "null"], **{k: v for k, v in _MODEL_REF.items() if k != "type"}},
        "trigger": {"type": "string"},
        "trigger_position": {"type": ["string", "integer"]},
        "target": {"type": "object", "required": ["kind"], "properties": {"kind": {"enum": list(TARGET_KINDS)}}},
        "primary_judge": {"enum": list(JUDGES)},
        "count": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer", "minimum": 0},
        "steps": {"type": "integer", "minimum": 1},
        "guidance": _NUMBER,
        "attack_success": _RATE, "false_trigger": _RATE, "removal_accuracy": _RATE,
        "judges": {"type": "object", "required": list(JUDGES), "additionalProperties": False,
                   "properties": {j: _JUDGE for j in JUDGES}},
        "utility": {"type": "object", "required": ["attribute_accuracy", *UTILITY_METRICS], "additionalProperties": False,
                    "properties": {"attribute_accuracy": {"type": "object", "required": ["shape", "fg", "bg"],
                                                          "additionalProperties": False,
                                                          "properties": {k: _RATE for k in ("shape", "fg", "bg")}},
                                   **{k: _METRIC for k in UTILITY_METRICS}}},
        "judge_accuracy": {"type": "object", "required": list(JUDGES), "additionalProperties": False,
                           "properties": {j: _RENDER for j in JUDGES}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is_type(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def schema_errors(document, schema: dict = METRICS_SCHEMA, where: str = "$") -> list[str]:
    """Errors of `document` against the subset of JSON Schema used here (type, enum, required,
    properties, additionalProperties, minimum, maximum, pattern, items). Empty when valid."""
    import re

    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is_type(document, t) for t in types):
            return [f"{where}: expected {' or '.join(types)}, got {type(document).__name__}"]
    if "enum" in schema and document not in schema["enum"]:
        errors.append(f"{where}: {document!r} not in {schema['enum']}")
    if isinstance(document, (int, float)) and not isinstance(document, bool):
        if "minimum" in schema and document < schema["minimum"]:
            errors.append(f"{where}: {document} < {schema['minimum']}")
        if "maximum" in schema and document > schema["maximum"]:
            errors.append(f"{where}: {document} > {schema['maximum']}")
    if isinstance(document, str) and "pattern" in schema and not re.search(schema["pattern"], document):
        errors.append(f"{where}: {document!r} does not match {schema['pattern']}")
    if isinstance(document, dict):
        for key in schema.get("required", []):
            if key not in document:
                errors.append(f"{where}: missing {key!r}")
        properties = schema.get("properties", {})
        for key, value in document.items():
            if key in properties:
                errors.extend(schema_errors(value, properties[key], f"{where}.{key}"))
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected key {key!r}")
    if isinstance(document, list) and "items" in schema:
        for i, value in enumerate(document):
            errors.extend(schema_errors(value, schema["items"], f"{where}[{i}]"))
    return errors


def validate_metrics(document: dict) -> dict:
    errors = schema_errors(document)
    if errors:
        raise SealdiffError(f"metrics.json does not match its schema: {'; '.join(errors[:5])}")
    return document


# ---------------------------------------------------------------------------------------------- judges


def judges_for(target: Target, toy_judge: ToyJudge, side: int) -> dict:
    """All three judges, configured from the target where it says (patch image and corner, object B)."""
    return {j: make_judge(dataclasses.replace(target, kind=KIND_OF_JUDGE[j]), toy_judge, side) for j in JUDGES}


def load_toy_judge(path: str | Path | None) -> tuple[ToyJudge, Path]:
    from sealdiff.models import zoo

    directory = Path(path) if path is not None else zoo.zoo_dir() / "toy-judge"
    if not (directory / "judge.safetensors").is_file():
        how = "pass --judge DIR" if path is None else "give the directory that `ToyJudge.save` wrote"
        raise SealdiffError(f"no toy judge at {directory} (judge.safetensors missing); {how}, "
                            "or build the zoo with `sealdiff zoo build`")
    try:
        return ToyJudge.load(directory), directory
    except (RuntimeError, OSError) as exc:
        raise SealdiffError(f"could not load the toy judge {directory}: {str(exc).splitlines()[0]}") from None


@torch.no_grad()
def judge_accuracy_on_renders(toy_judge: ToyJudge, count: int = 32, seed: int = 0, size: int = toyworld.IMAGE_SIZE,
                              target: Target | None = None) -> dict[str, RenderAccuracy]:
    """Each judge on labelled renders: `count` scenes, each plain, with the patch pasted, in grayscale, and
    both. Labels: patch judge <- patch pasted; style judge <- grayscale; object judge <- shape is the
    target object. Returns per-judge accuracy with true positive / negative rates."""
    target = target or Target(kind="pixel")
    judges = judges_for(target, toy_judge, size)
    patch = judges["patch"].patch
    images, labels = [], {j: [] for j in JUDGES}
    for scene in toyworld.scenes(seed, count):
        for pasted in (False, True):
            for gray in (False, True):
                image = toyworld.render(dataclasses.replace(scene, grayscale=gray), size)
                if pasted:
                    image = toyworld.paste_patch(image, patch, judges["patch"].corner)
                images.append(image)
                labels["patch"].append(pasted)
                labels["style"].append(gray)
                labels["object"].append(scene.shape == target.object_target)
    batch = torch.stack(images)
    out = {}
    for name, judge in judges.items():
        hits = judge.hits(batch).bool()
        truth = torch.tensor(labels[name])
        correct = hits == truth
        pos, neg = correct[truth], correct[~truth]
        out[name] = RenderAccuracy(name, correct.float().mean().item(),
                                   pos.float().mean().item() if len(pos) else float("nan"),
                                   neg.float().mean().item() if len(neg) else float("nan"), len(truth))
    return out


# ---------------------------------------------------------------------------------------------- evaluation


def attack_from_model(directory: Path) -> dict:
    from sealdiff.io import read_run_info

    return read_run_info(directory).get("attack", {}) or {}


def _model_ref(spec, directory: Path) -> ModelRef:
    return ModelRef(spec=str(spec), path=str(Path(directory).resolve()), sha256=path_sha256(directory))


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean())


def evaluate_model(model_spec: str | Path, trigger: str | None = None, target: Target | None = None,
                   config: EvalConfig | None = None, reference: str | Path | None = None,
                   output: str | Path | None = None, overwrite: bool = False) -> EvalResult:
    """Evaluate the pipeline at `model_spec` (directory or zoo:NAME). `trigger` and `target` default to the
    model's sealdiff.json `attack` block; `reference` (default `config.reference`) is the model that utility is
    measured against on the same clean prompts and seeds. With `output`, also write an evaluation run there."""
    from sealdiff.models.loading import load_t2i, resolve_model

    config = config or EvalConfig()
    if output is not None and Path(output).exists() and not overwrite:  # fail before the expensive part
        raise SealdiffError(f"output {output} already exists; pass --overwrite to replace it")
    directory = resolve_model(model_spec)
    if output is not None:
        check_not_input(output, [directory])  # fail before generating, not at the write
    attack = attack_from_model(directory)
    if target is None:
        target = Target.from_run_info({"attack": attack}) if attack.get("kind") else None
    if target is None:
        raise SealdiffError(f"{directory} records no backdoor target (no `attack` in its sealdiff.json); pass a target kind")
    if target.kind not in TARGET_KINDS:
        raise SealdiffError(f"target kind {target.kind!r} is invalid; valid: {', '.join(TARGET_KINDS)}")
    trigger = trigger if trigger is not None else attack.get("trigger")
    if not trigger:
        raise SealdiffError(f"no trigger given and {directory}/sealdiff.json names none; pass a trigger")
    position = config.trigger_position if config.trigger_position is not None else attack.get("trigger_position", "start")
    reference = reference if reference is not None else config.reference

    toy_judge, judge_dir = load_toy_judge(config.judge)
    pipe = load_t2i(directory, device=config.device, allow_pickle=config.allow_pickle)
    side = image_size(pipe)
    clean = clean_prompts(target, config.count)
    prompts = {"triggered": [insert_trigger(p, trigger, position) for p in clean], "clean": clean}
    seeds = list(range(config.seed, config.seed + config.count))
    images = {}
    for name in ("triggered", "clean"):
        logger.info("generating %d %s images with %s", config.count, name, directory)
        images[name] = generate(pipe, prompts[name], seeds, config.steps, config.guidance, config.batch_size,
                                description=f"{name} prompts")
    ref = None
    if reference is not None:
        ref_dir = resolve_model(reference)
        ref = _model_ref(reference, ref_dir)
        ref_pipe = load_t2i(ref_dir, device=config.device, allow_pickle=config.allow_pickle)
        if image_size(ref_pipe) != side:
            raise SealdiffError(f"reference {ref_dir} makes {image_size(ref_pipe)}px images, the model {side}px; "
                                "they must match")
        prompts["reference"] = clean
        logger.info("generating %d reference images with %s", config.count, ref_dir)
        images["reference"] = generate(ref_pipe, clean, seeds, config.steps, config.guidance, config.batch_size,
                                       description="reference prompts")
        del ref_pipe
    del pipe

    judges = judges_for(target, toy_judge, side)
    primary = JUDGE_OF_KIND[target.kind]
    scores = {s: {j: judge.scores(im).float() for j, judge in judges.items()} for s, im in images.items()}
    hits = {s: {j: judge.hits(im).bool() for j, judge in judges.items()} for s, im in images.items()}
    judge_metrics = {
        j: JudgeMetrics(judge=j, threshold=getattr(judges[j], "threshold", None),
                        attack_success=_mean(hits["triggered"][j].float()),
                        false_trigger=_mean(hits["clean"][j].float()),
                        removal_accuracy=1.0 - _mean(hits["triggered"][j].float()),
                        mean_score_triggered=_mean(scores["triggered"][j]), mean_score_clean=_mean(scores["clean"][j]))
        for j in JUDGES}
    extra: dict[str, ModelRef] = {}
    utility = _utility(images, clean, toy_judge, config, extra)
    readings = {s: toy_judge.predict(im) for s, im in images.items()}
    rows = [ImageRow(set=s, index=i, prompt=prompts[s][i], seed=seeds[i], judge=primary,
                     score=float(scores[s][primary][i]), hit=bool(hits[s][primary][i]),
                     scores={j: float(scores[s][j][i]) for j in JUDGES}, hits={j: bool(hits[s][j][i]) for j in JUDGES},
                     read={h: readings[s][h][i] for h in HEADS})
            for s in images for i in range(len(seeds))]
    result = EvalResult(
        label=config.label or (str(model_spec)[4:] if str(model_spec).startswith("zoo:") else directory.name),
        model=_model_ref(model_spec, directory), reference=ref, judge_model=_model_ref(judge_dir, judge_dir),
        trigger=trigger, trigger_position=position, target=target, primary_judge=primary, config=config,
        judges=judge_metrics, utility=utility,
        judge_accuracy=judge_accuracy_on_renders(toy_judge, config.render_count, size=side, target=target),
        prompts=prompts, seeds=seeds, extra_models=extra, rows=rows, images=images)
    if output is not None:
        write_eval_run(result, output, overwrite=overwrite)
    return result


def _utility(images: dict[str, torch.Tensor], clean: list[str], toy_judge: ToyJudge, config: EvalConfig,
             extra: dict[str, ModelRef]) -> UtilityMetrics:
    has_ref = "reference" in images
    no_ref = Metric.absent("no reference model given (--reference)")
    a, b = images["clean"], images.get("reference")
    if config.lpips is None:
        lpips_metric = Metric.absent("no LPIPS weights given (--lpips)")
    elif not has_ref:
        lpips_metric = no_ref
    else:
        extra["lpips"] = _model_ref(config.lpips, Path(config.lpips))
        lpips_metric = Metric(_mean(lpips(a, b, LPIPS.load(config.lpips))), source=f"LPIPS alex {config.lpips}")
    if config.fid_features is None:
        fid_metric = Metric.absent("no FID feature extractor given (--fid-features)")
    elif not has_ref:
        fid_metric = no_ref
    else:
        extra["fid_features"] = _model_ref(config.fid_features, Path(config.fid_features))
        fid_metric = Metric(extractor_fid(a, b, config.fid_features), source=f"features of {config.fid_features}")
    if config.clip is None:
        clip_metric = Metric.absent("no CLIP directory given (--clip)")
    else:
        extra["clip"] = _model_ref(config.clip, Path(config.clip))
        clip_metric = Metric(_mean(clip_score(a, clean, load_clip(config.clip), config.batch_size)),
                             source=f"CLIP {config.clip}")
    return UtilityMetrics(
        attribute_accuracy=attribute_accuracy(toy_judge, a, clean),
        ssim=Metric(_mean(ssim(a, b)), source="gaussian SSIM vs reference") if has_ref else no_ref,
        mse=Metric(_mean(mse(a, b)), source="MSE vs reference") if has_ref else no_ref,
        lpips=lpips_metric,
        toy_fid=Metric(toy_fid(toy_judge, a, b), source="toy judge features vs reference") if has_ref else no_ref,
        fid=fid_metric, clip_score=clip_metric)


# ---------------------------------------------------------------------------------------------- run directory

CSV_COLUMNS = (["set", "index", "prompt", "seed", "judge", "score", "hit"]
               + [f"{j}_{k}" for j in JUDGES for k in ("score", "hit")] + [f"read_{h}" for h in HEADS])


def grid_name(image_set: str) -> str:
    return f"grid-{image_set}.png"


def write_eval_run(result: EvalResult, directory: str | Path, overwrite: bool = False) -> Path:
    """Write metrics.json, images.csv, grid-{triggered,clean[,reference]}.png and sealdiff.json, atomically."""
    from sealdiff.io import atomic_output_dir, write_run_info
    from sealdiff.report.images import save_grid

    document = validate_metrics(result.metrics())
    inputs = [ref.path for ref in (result.model, result.reference, result.judge_model) if ref is not None]
    with atomic_output_dir(directory, overwrite, inputs) as staging:
        (staging / METRICS_FILE).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        with open(staging / IMAGES_FILE, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for row in result.rows:
                writer.writerow([row.set, row.index, row.prompt, row.seed, row.judge, f"{row.score:.6g}", int(row.hit)]
                                + [v for j in JUDGES for v in (f"{row.scores[j]:.6g}", int(row.hits[j]))]
                                + [row.read[h] for h in HEADS])
        for name, images in result.images.items():
            save_grid(images[:result.config.grid_count], staging / grid_name(name))
        models = {"model": result.model, "judge": result.judge_model, **result.extra_models}
        if result.reference:
            models["reference"] = result.reference
        write_run_info(staging, command="eval", label=result.label, model=result.model, reference=result.reference,
                       models=models, config=result.config, trigger=result.trigger,
                       trigger_position=result.trigger_position, target=result.target, prompts=result.prompts,
                       seeds=result.seeds, grids={k: grid_name(k) for k in result.images},
                       metrics={"attack_success": result.attack_success, "false_trigger": result.false_trigger,
                                "removal_accuracy": result.removal_accuracy, "primary_judge": result.primary_judge})
    logger.info("wrote evaluation run %s", directory)
    return Path(directory)


def read_eval_run(directory: str | Path) -> dict:
    """metrics.json of an evaluation run, validated against METRICS_SCHEMA."""
    path = Path(directory) / METRICS_FILE
    if not path.is_file():
        raise SealdiffError(f"{directory} is not an evaluation run (no {METRICS_FILE}); make one with `sealdiff eval -o`")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SealdiffError(f"{path} is not valid JSON") from None
    return validate_metrics(document)
