"""One self-contained HTML page comparing evaluation runs (`sealdiff eval -o RUN_DIR`, text-to-image or
unconditional), unconditional scans (`sealdiff scan -o DIR`) or unconditional removal outputs (`sealdiff remove
--method elijah|diff-cleanse|diffdefend -o DIR`).

Everything is inline: images and plots are PNG data URIs, the style sheet is embedded, there is no
script and no external resource. The page shows the runs' image grids side by side for the same prompts
and seeds, the metrics table (absent metrics as a dash with their reason), the judges' accuracy on
labelled renders, plots of removal accuracy and utility per run, and training-loss curves where a run's
sealdiff.json (or its model's) records `losses`.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from PIL import Image

from sealdiff.errors import SealdiffError
from sealdiff.io import read_run_info
from sealdiff.metrics.evaluate import IMAGE_SETS, JUDGES, METRICS_FILE, UTILITY_METRICS, grid_name, read_eval_run
from sealdiff.models.uncond import ModelKind
from sealdiff.report.images import data_uri, removal_grid_name, sampler_grid_name

logger = logging.getLogger(__name__)

SET_TITLES = {"triggered": "Triggered prompts", "clean": "Clean prompts",
              "reference": "Reference model, clean prompts"}
METRIC_NAMES = {"ssim": "SSIM", "mse": "MSE", "lpips": "LPIPS", "toy_fid": "toy FID", "fid": "FID",
                "clip_score": "CLIP score"}
METRIC_TITLES = {"ssim": "SSIM ↑", "mse": "MSE ↓", "lpips": "LPIPS ↓", "toy_fid": "toy FID ↓", "fid": "FID ↓",
                 "clip_score": "CLIP ↑"}
GRID_PROMPTS = 16


@dataclass
class Run:
    """One evaluation run as the report sees it."""

    label: str
    path: Path
    metrics: dict
    info: dict
    grids: dict[str, Path] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)  # source -> curve


def _numbers(value) -> list[float] | None:
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return None


def find_losses(info: dict) -> list[float] | None:
    """`losses` of a sealdiff.json: top level, or one level down (e.g. a removal run's `result`)."""
    direct = _numbers(info.get("losses"))
    if direct:
        return direct
    for value in info.values():
        if isinstance(value, dict) and _numbers(value.get("losses")):
            return _numbers(value["losses"])
    return None


def load_run(directory: str | Path) -> Run:
    directory = Path(directory)
    if not directory.is_dir():
        raise SealdiffError(f"run directory {directory} does not exist")
    metrics = read_eval_run(directory)
    info = read_run_info(directory)
    label = info.get("label") or directory.name
    grids = {s: directory / grid_name(s) for s in IMAGE_SETS if (directory / grid_name(s)).is_file()}
    losses = {}
    own = find_losses(info)
    if own:
        losses["run"] = own
    model_path = Path(metrics["model"]["path"])
    if not own and model_path.is_dir():
        model_losses = find_losses(read_run_info(model_path))
        if model_losses:
            losses["model"] = model_losses
    return Run(label=str(label), path=directory, metrics=metrics, info=info, grids=grids, losses=losses)


REMOVAL_SETS = {"triggered": "Triggered noise (the recorded attack's trigger)", "clean": "Clean noise"}
SCAN_SETS = ("inverted", "clean")
GRID_CAPTIONS = {"clean": "noise", "inverted": "noise + inverted trigger", "triggered": "noise + trigger",
                 "reference": "reference model, noise"}


@dataclass
class UncondRun:
    """One unconditional scan, removal or evaluation output as the report sees it: its sealdiff.json and image
    grids."""

    label: str
    path: Path
    info: dict
    grids: dict[tuple[str, str], Path] = field(default_factory=dict)  # removal: (set, stage); else (sampler, set)
    losses: dict[str, list[float]] = field(default_factory=dict)


def output_kind(directory: Path) -> str:
    """'scan', 'remove' or 'uncond-eval' for an unconditional scan, removal or evaluation output, 'eval' otherwise
    (a text-to-image evaluation run)."""
    if not (directory / "sealdiff.json").is_file() or (directory / METRICS_FILE).is_file():
        return "eval"
    info = read_run_info(directory)
    if info.get("model_kind") not in get_args(ModelKind):
        return "eval"
    return {"scan": "scan", "remove": "remove", "eval": "uncond-eval"}.get(info.get("command"), "eval")


def load_uncond_run(directory: Path) -> UncondRun:
    info = read_run_info(directory)
    if info["command"] in ("scan", "eval"):
        recorded = info.get("grids") or {}
        keys = [(sampler, image_set) for sampler in recorded.get("samplers", ())
                for image_set in recorded.get("sets", SCAN_SETS)]
        names = {key: sampler_grid_name(*key) for key in keys}
    else:
        names = {(image_set, stage): removal_grid_name(image_set, stage) for image_set in REMOVAL_SETS
                 for stage in ("before", "after")}
    grids = {key: directory / name for key, name in names.items() if (directory / name).is_file()}
    losses = find_losses(info)
    return UncondRun(label=str(info.get("label") or directory.name), path=directory, info=info, grids=grids,
                     losses={"run": losses} if losses else {})


# ---------------------------------------------------------------------------------------------- plots


def _figure_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bars(runs: list[Run], series: dict[str, list[float | None]], title: str, ylabel: str, ylim=None) -> str:
    import numpy as np
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.5, 1.2 * len(runs) * max(1, len(series)) ** 0.5 + 2), 3.2))
    axis = figure.add_subplot()
    x = np.arange(len(runs))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else v for v in values]
        axis.bar(x + (k - (len(series) - 1) / 2) * width, heights, width, label=name)
    axis.set_xticks(x, [r.label for r in runs], rotation=20 if len(runs) > 3 else 0, ha="right" if len(runs) > 3 else "center")
    axis.set_title(title)
    axis.set_ylabel(ylabel)
    if ylim:
        axis.set_ylim(*ylim)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _figure_uri(figure)


def removal_plot(runs: list[Run]) -> str:
    series = {j: [r.metrics["judges"][j]["removal_accuracy"] for r in runs] for j in JUDGES}
    return _bars(runs, series, "Removal accuracy per judge (1 − attack success)", "removal accuracy", (0, 1.05))


def utility_plot(runs: list[Run]) -> str:
    series: dict[str, list[float | None]] = {
        f"toy {k} accuracy": [r.metrics["utility"]["attribute_accuracy"][k] for r in runs] for k in ("shape", "fg", "bg")}
    ssims = [r.metrics["utility"]["ssim"]["value"] for r in runs]
    if any(v is not None for v in ssims):
        series["SSIM vs reference"] = ssims
    return _bars(runs, series, "Utility on clean prompts", "score", (0, 1.05))


def loss_plot(runs: list[Run], title: str = "Training loss") -> str | None:
    import numpy as np
    from matplotlib.figure import Figure

    curves = [(r.label + ("" if source == "run" else " (model)"), values) for r in runs for source, values in r.losses.items()]
    if not curves:
        return None
    figure = Figure(figsize=(6.5, 3.2))
    axis = figure.add_subplot()
    for name, values in curves:
        y = np.asarray(values)
        line, = axis.plot(np.arange(1, len(y) + 1), y, alpha=0.35 if len(y) > 50 else 1.0, linewidth=1)
        if len(y) > 50:
            window = max(2, len(y) // 50)
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            axis.plot(np.arange(window, len(y) + 1), smooth, color=line.get_color(), linewidth=1.8, label=name)
        else:
            line.set_label(name)
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    if all(v > 0 for _, values in curves for v in values):
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _figure_uri(figure)


# ---------------------------------------------------------------------------------------------- html

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1200px;color:#1d232a;
     background:#fff;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #d8dee4;padding-bottom:4px}
.sub{color:#57606a;margin-top:0}
table{border-collapse:collapse;font-size:0.88em;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right}
th{background:#f3f5f7}td.l,th.l{text-align:left}
td.absent{color:#8c959f;text-align:center}
.grids{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0;border:1px solid #d0d7de;padding:6px;background:#fafbfc}
figure img{image-rendering:pixelated;display:block;max-width:560px}
figcaption{font-size:0.85em;margin-top:4px;text-align:center;font-weight:600}
.plots img{max-width:49%;margin:8px 0 0 0;vertical-align:top}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px}
.note{color:#57606a;font-size:0.85em}
code{background:#f3f5f7;padding:0 3px}
ol.prompts{font-size:0.8em;columns:2;color:#57606a}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _pct(value) -> str:
    return "—" if value is None else f"{value:.1%}"


def _visible(text: str) -> str:
    """A trigger with invisible characters made visible (U+200B -> \\u200b)."""
    return "".join(c if c.isprintable() and not c.isspace() or c == " " else f"\\u{ord(c):04x}" for c in text)


def _head(title: str) -> str:
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{STYLE}</style></head>"
            f"<body>\n<h1>{_e(title)}</h1>")


def _metric_cell(metric: dict) -> str:
    if metric["value"] is None:
        return f'<td class="absent" title="{_e(metric["reason"])}">—</td>'
    return f'<td title="{_e(metric.get("source") or "")}">{metric["value"]:.4g}</td>'


def _consistency(runs: list[Run]) -> str:
    keys = [(tuple(r.info.get("prompts", {}).get("clean", [])), tuple(r.info.get("seeds", [])),
             r.metrics["steps"], r.metrics["guidance"]) for r in runs]
    if len(set(keys)) == 1:
        m = runs[0].metrics
        return (f'<p class="note">All runs use the same {m["count"]} clean prompts (and their triggered versions), '
                f'seeds {m["seed"]}…{m["seed"] + m["count"] - 1}, {m["steps"]} steps, guidance {m["guidance"]:g}.</p>')
    first = keys[0]
    differ = [r.label for r, k in zip(runs, keys) if k != first]
    return (f'<p class="warn">Runs differ in prompts, seeds, steps or guidance ({_e(", ".join(differ))} differ from '
            f'{_e(runs[0].label)}): their images are not the same prompts and seeds.</p>')


def render_html(runs: list[Run], title: str = "sealdiff report") -> str:
    parts = [_head(title),
             f'<p class="sub">{len(runs)} evaluation run{"s" if len(runs) != 1 else ""}: '
             f'{_e(", ".join(r.label for r in runs))}</p>']

    parts.append("<h2>Runs</h2><table><tr><th class=l>run</th><th class=l>model</th><th class=l>sha256</th>"
                  "<th class=l>reference</th><th class=l>trigger</th><th class=l>target</th><th>prompts</th></tr>")
    for r in runs:
        m = r.metrics
        ref = m["reference"]["spec"] if m["reference"] else "—"
        target = m["target"]["kind"]
        parts.append(f"<tr><td class=l>{_e(r.label)}</td><td class=l><code>{_e(m['model']['spec'])}</code></td>"
                     f"<td class=l><code>{_e(m['model']['sha256'][:12])}</code></td><td class=l>{_e(ref)}</td>"
                     f"<td class=l><code>{_e(_visible(m['trigger']))}</code> ({_e(m['trigger_position'])})</td>"
                     f"<td class=l>{_e(target)}</td><td>{m['count']}</td></tr>")
    parts.append("</table>")
    parts.append(_consistency(runs))

    parts.append("<h2>Metrics</h2><table><tr><th class=l>run</th><th>judge</th><th>attack success</th>"
                 "<th>removal accuracy</th><th>false trigger</th>"
                 + "".join(f"<th>ASR {j}</th>" for j in JUDGES)
                 + "".join(f"<th>toy {k}</th>" for k in ("shape", "fg", "bg"))
                 + "".join(f"<th>{_e(METRIC_TITLES[k])}</th>" for k in UTILITY_METRICS) + "</tr>")
    reasons: dict[str, set[str]] = {}
    for r in runs:
        m, u = r.metrics, r.metrics["utility"]
        parts.append(f"<tr><td class=l>{_e(r.label)}</td><td>{_e(m['primary_judge'])}</td><td>{_pct(m['attack_success'])}</td>"
                     f"<td>{_pct(m['removal_accuracy'])}</td><td>{_pct(m['false_trigger'])}</td>"
                     + "".join(f"<td>{_pct(m['judges'][j]['attack_success'])}</td>" for j in JUDGES)
                     + "".join(f"<td>{_pct(u['attribute_accuracy'][k])}</td>" for k in ("shape", "fg", "bg"))
                     + "".join(_metric_cell(u[k]) for k in UTILITY_METRICS) + "</tr>")
        for k in UTILITY_METRICS:
            if u[k]["value"] is None:
                reasons.setdefault(u[k]["reason"], set()).add(METRIC_NAMES[k])
    parts.append("</table>")
    parts.append('<p class="note">Attack success: share of triggered prompts whose image the judge reads as the '
                 "target; false trigger: the same on clean prompts; toy shape/fg/bg: the toy judge reads the clean "
                 "image as its caption says; SSIM/MSE/LPIPS/FID: clean images against the reference model's "
                 "for the same prompts and seeds.</p>")
    if reasons:
        parts.append('<p class="note">Absent metrics (—): ' + "; ".join(
            f"{_e(', '.join(sorted(names)))}: {_e(reason)}" for reason, names in sorted(reasons.items())) + "</p>")

    for image_set in IMAGE_SETS:
        with_set = [r for r in runs if image_set in r.grids]
        if not with_set:
            continue
        parts.append(f"<h2>{_e(SET_TITLES[image_set])}</h2><div class=\"grids\">")
        for r in with_set:
            picture = Image.open(r.grids[image_set]).convert("RGB")
            hits = _grid_hits(r, image_set)
            parts.append(f'<figure><img alt="{_e(r.label)} {image_set}" src="{data_uri(picture)}">'
                         f"<figcaption>{_e(r.label + hits)}</figcaption></figure>")
        parts.append("</div>")
        prompts = with_set[0].info.get("prompts", {}).get(image_set, [])[:GRID_PROMPTS]
        seeds = with_set[0].info.get("seeds", [])
        if prompts:
            parts.append("<details><summary class=\"note\">prompts and seeds of the grid images (row by row)"
                         "</summary><ol class=\"prompts\">" + "".join(
                             f"<li><code>{_e(_visible(p))}</code> — seed {seeds[i] if i < len(seeds) else '?'}</li>"
                             for i, p in enumerate(prompts)) + "</ol></details>")
    parts.append("<h2>Plots</h2><div class=\"plots\">")
    parts.append(f'<img alt="removal accuracy per run" src="{removal_plot(runs)}">')
    parts.append(f'<img alt="utility per run" src="{utility_plot(runs)}">')
    losses = loss_plot(runs)
    if losses:
        parts.append(f'<img alt="training loss" src="{losses}">')
    else:
        parts.append('<p class="note">No training losses recorded in the runs or their models.</p>')
    parts.append("</div>")

    parts.append("<h2>Judges on labelled renders</h2><table><tr><th class=l>run</th>"
                 + "".join(f"<th>{j} accuracy</th><th>{j} TPR</th><th>{j} TNR</th>" for j in JUDGES) + "</tr>")
    for r in runs:
        acc = r.metrics["judge_accuracy"]
        parts.append(f"<tr><td class=l>{_e(r.label)}</td>" + "".join(
            f"<td>{_pct(acc[j]['accuracy'])}</td><td>{_pct(acc[j]['true_positive_rate'])}</td>"
            f"<td>{_pct(acc[j]['true_negative_rate'])}</td>" for j in JUDGES) + "</tr>")
    parts.append("</table><p class=\"note\">Toy renders plain, with the patch, in grayscale and both; TPR: hits "
                 "where the target is present, TNR: no hit where it is absent.</p>")

    parts.append('<p class="note">Generated by sealdiff report.</p></body></html>\n')
    return "\n".join(parts)


def _per_sampler(run: UncondRun) -> dict[str, dict]:
    measured = run.info.get("measured") or {}
    if measured.get("per_sampler"):
        return measured["per_sampler"]
    sampler = (run.info.get("grids") or {}).get("sampler", "")
    return {sampler: measured} if measured.get("before") else {}


def render_removal_html(runs: list[UncondRun], title: str = "sealdiff report") -> str:
    """The page for unconditional removal outputs: what was removed with which inverted trigger, attack success
    before/after per sampler, the before/after grids from the same noise, the inverted triggers, the losses."""
    parts = [_head(title),
             f'<p class="sub">{len(runs)} unconditional removal{"s" if len(runs) != 1 else ""}: '
             f'{_e(", ".join(r.label for r in runs))}</p>',
             "<h2>Runs</h2><table><tr><th class=l>run</th><th class=l>parent model</th><th class=l>sha256</th>"
             "<th class=l>kind</th><th class=l>removal</th><th class=l>inverted trigger</th><th class=l>clean data</th>"
             "<th>seconds</th></tr>"]
    for r in runs:
        info, trigger, parent = r.info, r.info.get("trigger") or {}, r.info.get("parent") or {}
        source = trigger.get("source", "?")
        found = (f"scan: {trigger.get('method')} score {trigger['score']:.3f}" if source == "scan" and "score" in trigger
                 else f"{source} {trigger.get('path', '')}")
        result = info.get("result") or {}
        data = (info.get("data") or {}).get("path") or (result.get("extra") or {}).get("data") or "model-generated"
        seconds = result.get("seconds")
        parts.append(f"<tr><td class=l>{_e(r.label)}</td><td class=l><code>{_e(parent.get('path', '?'))}</code></td>"
                     f"<td class=l><code>{_e(str(parent.get('sha256', '?'))[:12])}</code></td><td class=l>{_e(info['model_kind'])}"
                     f"</td><td class=l>{_e(info.get('defense'))}</td><td class=l>{_e(found)}, γ "
                     f"{trigger.get('noise_scale', 1.0):g}</td><td class=l>{_e(data)}</td>"
                     f"<td>{'—' if seconds is None else f'{seconds:.0f}'}</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Before and after</h2><table><tr><th class=l>run</th><th class=l>sampler</th>"
                 "<th>attack success before</th><th>after</th><th>false trigger after</th>"
                 "<th>clean SSIM to before ↑</th><th>clean MSE to before ↓</th><th>samples</th></tr>")
    unmeasured = []
    for r in runs:
        attack = _per_sampler(r)
        closeness = (r.info.get("measured") or {}).get("clean_closeness") or {}
        if not attack and not closeness:
            unmeasured.append(r.label)
        for sampler in dict.fromkeys([*attack, *closeness]):
            row, close = attack.get(sampler), closeness.get(sampler)
            cells = [_pct(row["before"]["attack_success"]), _pct(row["after"]["attack_success"]),
                     _pct(row["after"]["false_trigger_rate"])] if row else ["—"] * 3
            cells += [f"{close['ssim']:.3f}", f"{close['mse']:.4f}"] if close else ["—"] * 2
            parts.append(f"<tr><td class=l>{_e(r.label)}</td><td class=l>{_e(sampler)}</td>"
                         + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{r.info['measured']['count']}</td></tr>")
    parts.append("</table><p class=\"note\">Attack success: share of samples from noise stamped with the recorded "
                 "attack's true trigger (read only to measure) within the MSE threshold of its target; false trigger: "
                 "the same on clean noise (— where the model records no attack). Clean SSIM / MSE: the repaired "
                 "model's samples against the model's own before removal, from the same clean noise.</p>")
    if unmeasured:
        parts.append(f'<p class="warn">Not measured (--measure 0): {_e(", ".join(unmeasured))}</p>')

    for image_set, set_title in REMOVAL_SETS.items():
        with_set = [r for r in runs if (image_set, "after") in r.grids]
        if not with_set:
            continue
        parts.append(f"<h2>{_e(set_title)}</h2><div class=\"grids\">")
        for r in with_set:
            sampler = (r.info.get("grids") or {}).get("sampler", "")
            for stage in ("before", "after"):
                if (image_set, stage) in r.grids:
                    picture = Image.open(r.grids[(image_set, stage)]).convert("RGB")
                    parts.append(f'<figure><img alt="{_e(r.label)} {image_set} {stage}" src="{data_uri(picture)}">'
                                 f"<figcaption>{_e(f'{r.label}: {stage} ({sampler})')}</figcaption></figure>")
        parts.append("</div>")

    parts.append(_triggers_and_losses(runs, "inverted_trigger.png", "Training loss"))
    return "\n".join(parts)


def _triggers_and_losses(runs: list[UncondRun], trigger_file: str, loss_title: str) -> str:
    """The inverted trigger images, the loss curve and the page's end."""
    parts = []
    triggers = [(r, r.path / trigger_file) for r in runs if (r.path / trigger_file).is_file()]
    if triggers:
        parts.append("<h2>Inverted triggers</h2><div class=\"grids\">" + "".join(
            f'<figure><img alt="{_e(r.label)} inverted trigger" src="{data_uri(Image.open(path).convert("RGB"))}">'
            f"<figcaption>{_e(r.label)}</figcaption></figure>" for r, path in triggers) + "</div>")
    losses = loss_plot(runs, loss_title)
    parts.append(f"<h2>{_e(loss_title)}</h2>" + (f'<div class="plots"><img alt="{_e(loss_title.lower())}" '
                                                 f'src="{losses}"></div>' if losses else
                                                 '<p class="note">No losses recorded.</p>'))
    parts.append('<p class="note">Generated by sealdiff report.</p></body></html>\n')
    return "\n".join(parts)


def _sampler_grids(runs: list[UncondRun], heading: str, note: str) -> str:
    """The runs' per-sampler grids (scans, unconditional evaluations) as captioned figures."""
    figures = [f'<figure><img alt="{_e(r.label)} {sampler} {image_set}" '
               f'src="{data_uri(Image.open(path).convert("RGB"))}"><figcaption>'
               f"{_e(f'{r.label}: {GRID_CAPTIONS.get(image_set, image_set)} ({sampler})')}</figcaption></figure>"
               for r in runs for (sampler, image_set), path in r.grids.items()]
    if not figures:
        return ""
    return f"<h2>{_e(heading)}</h2><div class=\"grids\">" + "".join(figures) + f"</div><p class=\"note\">{_e(note)}</p>"


def render_scan_html(runs: list[UncondRun], title: str = "sealdiff report") -> str:
    """The page for unconditional scans: verdicts and scores, samples from the scan's noise with and without the
    inverted trigger per detection sampler, the inverted triggers, the inversion losses."""
    parts = [_head(title),
             f'<p class="sub">{len(runs)} unconditional scan{"s" if len(runs) != 1 else ""}: '
             f'{_e(", ".join(r.label for r in runs))}</p>',
             "<h2>Verdicts</h2><table><tr><th class=l>run</th><th class=l>model</th><th class=l>sha256</th>"
             "<th class=l>kind</th><th class=l>method</th><th class=l>verdict</th><th>score</th><th>threshold</th>"
             "<th class=l>input x_T</th><th>seconds</th></tr>"]
    for r in runs:
        result, parent = r.info.get("result") or {}, r.info.get("parent") or {}
        gamma = result.get("noise_scale", 1.0)
        parts.append(f"<tr><td class=l>{_e(r.label)}</td><td class=l><code>{_e(parent.get('path', '?'))}</code></td>"
                     f"<td class=l><code>{_e(str(parent.get('sha256', '?'))[:12])}</code></td>"
                     f"<td class=l>{_e(r.info['model_kind'])}</td><td class=l>{_e(result.get('method'))}</td>"
                     f"<td class=l><b>{_e(result.get('verdict'))}</b></td><td>{result.get('score', 0):.3f}</td>"
                     f"<td>{result.get('threshold', 0):g}</td><td class=l>{'' if gamma == 1 else f'{gamma:g}·'}ε + τ</td>"
                     f"<td>{result.get('seconds', 0):.0f}</td></tr>")
    parts.append("</table><p class=\"note\">τ: the trigger the scan inverted; it was never given the true one.</p>")
    parts.append("<h2>Scores</h2>")
    for r in runs:
        scores = (r.info.get("result") or {}).get("scores") or {}
        rows = "".join(f"<tr><td class=l>{_e(name)}</td><td>{value:.4g}</td></tr>" for name, value in sorted(scores.items()))
        parts.append(f"<details><summary>{_e(r.label)}: {len(scores)} statistics</summary><table>{rows}</table>"
                     "</details>")
    parts.append(_sampler_grids(runs, "Samples with and without the inverted trigger",
                                "The same noise in both grids of a sampler; a backdoored model's samples collapse onto "
                                "one image when the inverted trigger is added."))
    parts.append(_triggers_and_losses(runs, "trigger.png", "Inversion loss"))
    return "\n".join(parts)


def render_uncond_eval_html(runs: list[UncondRun], title: str = "sealdiff report") -> str:
    """The page for unconditional evaluations: per sampler attack success, the samples' collapse under the trigger and
    their closeness to a reference model, with the grids from the same noise."""
    parts = [_head(title),
             f'<p class="sub">{len(runs)} unconditional evaluation{"s" if len(runs) != 1 else ""}: '
             f'{_e(", ".join(r.label for r in runs))}</p>',
             "<h2>Runs</h2><table><tr><th class=l>run</th><th class=l>model</th><th class=l>sha256</th>"
             "<th class=l>kind</th><th class=l>trigger</th><th class=l>reference</th><th>samples</th></tr>"]
    for r in runs:
        info, parent = r.info, r.info.get("parent") or {}
        trigger, reference = info.get("trigger"), info.get("reference")
        found = "none" if not trigger else f"{trigger.get('path') or trigger['source']}, γ {trigger['noise_scale']:g}"
        parts.append(f"<tr><td class=l>{_e(r.label)}</td><td class=l><code>{_e(parent.get('path', '?'))}</code></td>"
                     f"<td class=l><code>{_e(str(parent.get('sha256', '?'))[:12])}</code></td>"
                     f"<td class=l>{_e(info['model_kind'])}</td><td class=l>{_e(found)}</td>"
                     f"<td class=l>{_e(reference['path']) if reference else '—'}</td><td>{info.get('count')}</td></tr>")
    parts.append("</table><h2>Per sampler</h2><table><tr><th class=l>run</th><th class=l>sampler</th>"
                 "<th>attack success</th><th>false trigger</th><th>collapse</th><th>SSIM to reference ↑</th>"
                 "<th>MSE to reference ↓</th></tr>")
    for r in runs:
        for sampler, row in (r.info.get("per_sampler") or {}).items():
            attack, close = row.get("attack"), row.get("reference")
            cells = [_pct(attack["attack_success"]), _pct(attack["false_trigger_rate"])] if attack else ["—"] * 2
            cells.append("—" if row.get("collapse") is None else f"{row['collapse']:.3f}")
            cells += [f"{close['ssim']:.3f}", f"{close['mse']:.4f}"] if close else ["—"] * 2
            parts.append(f"<tr><td class=l>{_e(r.label)}</td><td class=l>{_e(sampler)}</td>"
                         + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table><p class=\"note\">Attack success: share of samples from noise stamped with the trigger within "
                 "the MSE threshold of the attack's target (— for an inverted trigger: its target is unknown); false "
                 "trigger: the same on clean noise; collapse: 1 − the triggered samples' uniformity over the clean "
                 "ones' (near 0: the trigger changes nothing; near 1: every sample is the same image); SSIM / MSE: "
                 "the clean samples against the reference model's from the same noise.</p>")
    parts.append(_sampler_grids(runs, "Samples", "The same noise in every grid of a sampler."))
    parts.append('<p class="note">Generated by sealdiff report.</p></body></html>\n')
    return "\n".join(parts)


def _grid_hits(run: Run, image_set: str) -> str:
    metrics = run.metrics
    if image_set == "triggered":
        return f" — attack success {_pct(metrics['attack_success'])}"
    if image_set == "clean":
        return f" — false trigger {_pct(metrics['false_trigger'])}"
    return f" — reference {metrics['reference']['spec']}" if metrics["reference"] else ""


def write_report(run_dirs: list[str | Path], output: str | Path, title: str = "sealdiff report",
                 overwrite: bool = False) -> Path:
    """Write one self-contained HTML page for the evaluation runs; atomically (temp file, then rename)."""
    if not run_dirs:
        raise SealdiffError("no run directories given")
    output = Path(output)
    if output.exists() and not overwrite:
        raise SealdiffError(f"output {output} already exists; pass --overwrite to replace it")
    kinds = {output_kind(Path(d)) for d in run_dirs}
    if len(kinds) > 1:
        raise SealdiffError("give one kind of output per report: text-to-image evaluation runs (`sealdiff eval -o`), "
                            "or unconditional evaluations, scans (`sealdiff scan -o`) or removal outputs "
                            "(`sealdiff remove -o`)")
    kind = kinds.pop()
    runs = [load_run(d) for d in run_dirs] if kind == "eval" else [load_uncond_run(Path(d)) for d in run_dirs]
    labels = [r.label for r in runs]
    for i, r in enumerate(runs):  # disambiguate repeated labels
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})" if r.path.name != r.label else f"{r.label} #{i + 1}"
    render = {"eval": render_html, "scan": render_scan_html, "remove": render_removal_html,
              "uncond-eval": render_uncond_eval_html}[kind]
    page = render(runs, title)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=output.parent, prefix=f".{output.name}.",
                                         suffix=".partial", delete=False)
    try:
        with handle:
            handle.write(page)
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, output)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    logger.info("wrote report %s", output)
    return output
