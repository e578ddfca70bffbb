"""The `ace eval` report: report.json, report.md (tables) and PNG plots, from an EvalResult."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # pyplot-free: no global figure state, no GUI backend

from training.evaluate import EvalResult, PairPrediction

ERROR_PLOT = "errors_per_landmark.png"
PAIRS_PLOT = "pairs.png"
MARKERS = ("x", "+", "^", "s", "D", "v")


def write_report(result: EvalResult, out_dir: str | Path, command: str, n_examples: int = 3) -> Path:
    """Write every report file into out_dir; returns the path of report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {**result.report, "command": command}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_errors_per_landmark(report["landmarks"], out / ERROR_PLOT)
    plot_pairs(result, pick_examples(result.predictions, n_examples), out / PAIRS_PLOT)
    (out / "report.md").write_text(render_markdown(report))
    return out / "report.md"


# ---------------------------------------------------------------------------------------------
# Markdown


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def summary_cells(s: dict[str, float]) -> list[str]:
    return [f"{s['mean_px']:.1f}", f"{s['median_px']:.1f}", f"{s['mean_pct']:.2f}",
            f"{s['median_pct']:.2f}", f"{100 * s['success_2pct']:.1f}", f"{100 * s['success_5pct']:.1f}",
            f"{int(s['n'])}"]


SUMMARY_HEADER = ("mean px", "median px", "mean % diag", "median % diag", "≤2 % diag (%)",
                  "≤5 % diag (%)", "n")


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# ACE evaluation report", "", f"Command: `{report['command']}`", "",
             f"Data: `{report['data']}`: {report['n_images']} images, {report['n_pairs']} ordered "
             "(query, target) pairs; every shared landmark of the query is located in the target.", ""]
    lines += method_section(report["methods"])
    lines += landmark_section(report["landmarks"])
    lines += crop_section(report["crop_retrieval"])
    if "real" in report:
        lines += real_section(report["real"])
    lines += ["## Plots", "", f"![error per landmark]({ERROR_PLOT})", "",
              f"![query/target pairs]({PAIRS_PLOT})", ""]
    return "\n".join(lines)


def method_section(methods: Sequence[dict[str, Any]]) -> list[str]:
    rows = [[m["name"], m["kind"], m.get("backbone", "-"), m.get("img_size", "-"), method_setting(m)]
            for m in methods]
    return ["## Methods", "", *table(("method", "kind", "backbone", "input px", "fingerprint / setting"),
                                     rows), ""]


def method_setting(method: dict[str, Any]) -> str:
    if "fingerprint" in method:
        return str(method["fingerprint"])
    return f"template {method['template_px']} px" if "template_px" in method else "-"


def landmark_section(landmarks: dict[str, Any]) -> list[str]:
    methods = list(landmarks)
    overall = [[name, *summary_cells(landmarks[name]["overall"])] for name in methods]
    names = list(next(iter(landmarks.values()))["per_landmark"])
    mean_rows = [[lm, *(f"{landmarks[m]['per_landmark'][lm]['mean_pct']:.2f}" for m in methods)]
                 for lm in names]
    success_rows = [[lm, *(f"{100 * landmarks[m]['per_landmark'][lm]['success_5pct']:.1f}"
                           for m in methods)] for lm in names]
    return ["## Cross-subject landmark localisation", "", "Overall (errors in target original pixels):",
            "", *table(("method", *SUMMARY_HEADER), overall), "", *mutual_lines(landmarks),
            "Mean radial error per landmark, % of the image diagonal:", "",
            *table(("landmark", *methods), mean_rows), "",
            "Success within 5 % of the diagonal per landmark (%):", "",
            *table(("landmark", *methods), success_rows), ""]


def mutual_lines(landmarks: dict[str, Any]) -> list[str]:
    rows = [[name, f"{100 * m['mutual']['rate']:.1f}", f"{m['mutual']['mean_pct_mutual']:.2f}",
             f"{m['mutual']['mean_pct_not_mutual']:.2f}"] for name, m in landmarks.items() if "mutual" in m]
    if not rows:
        return []
    return ["Mutual nearest neighbours (the service's confidence flag): how often a match is mutual "
            "and the mean error (% of diagonal) of mutual and non-mutual matches:", "",
            *table(("method", "mutual (%)", "mean % diag, mutual", "mean % diag, not mutual"), rows), ""]


def crop_section(crop: dict[str, Any]) -> list[str]:
    rows = [[name, f"{100 * r['top1']:.1f}", f"{100 * r['chance']:.1f}", int(r["groups"]),
             int(r["group_size"])] for name, r in crop.items()]
    return ["## Crop retrieval (spec 6.1)", "",
            "Find each image among its group from a random crop (side 30-80 % of the image side, "
            "resized to the input size), global embeddings, cosine top-1.", "",
            *table(("method", "top-1 (%)", "chance (%)", "groups", "group size"), rows), ""]


def real_section(real: dict[str, Any]) -> list[str]:
    rows = [[method, image, *summary_cells(s)] for method, per_image in real.items()
            for image, s in per_image.items()]
    return ["## Real images under known affine warps", "",
            "A grid of points in the original located in a randomly warped copy (rotation ±10°, "
            "scale 0.9-1.1, shear ±0.05 rad, shift ±5 %); errors in the warped image's pixels.", "",
            *table(("method", "image", *SUMMARY_HEADER), rows), ""]


# ---------------------------------------------------------------------------------------------
# Plots


def plot_errors_per_landmark(landmarks: dict[str, Any], path: Path) -> None:
    methods = list(landmarks)
    names = list(next(iter(landmarks.values()))["per_landmark"])
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(6.0, 0.7 * len(names) + 2), 4.5))
    ax = fig.subplots()
    positions = np.arange(len(names))
    for i, method in enumerate(methods):
        values = [landmarks[method]["per_landmark"][n]["mean_pct"] for n in names]
        ax.bar(positions + (i - (len(methods) - 1) / 2) * width, values, width, label=method)
    ax.set_xticks(positions, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean radial error (% of image diagonal)")
    ax.set_title("Cross-subject landmark error per landmark")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def pick_examples(predictions: Sequence[PairPrediction], n: int) -> list[PairPrediction]:
    """Evenly spread pairs, so the figure is not n pairs of the same query."""
    if not predictions:
        return []
    index = np.linspace(0, len(predictions) - 1, min(n, len(predictions))).round().astype(int)
    return [predictions[i] for i in dict.fromkeys(index.tolist())]


def plot_pairs(result: EvalResult, examples: Sequence[PairPrediction], path: Path) -> None:
    rows = max(1, len(examples))
    fig = Figure(figsize=(9, 4.5 * rows))
    axes = fig.subplots(rows, 2, squeeze=False)
    for row, pair in zip(axes, examples, strict=False):
        draw_pair(row, result, pair)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def show(ax: Any, pixels: np.ndarray) -> None:
    # extent puts pixel i at [i, i+1), the coordinate convention of the landmarks
    ax.imshow(pixels, extent=(0, pixels.shape[1], pixels.shape[0], 0))


def draw_pair(axes: np.ndarray, result: EvalResult, pair: PairPrediction) -> None:
    query_ax, target_ax = axes
    show(query_ax, result.images[pair.query].pixels)
    query_ax.scatter(*pair.query_xy.T, c="lime", s=18, label="query landmarks")
    query_ax.set_title(f"query {result.items[pair.query].image_id}", fontsize=9)
    show(target_ax, result.images[pair.target].pixels)
    target_ax.scatter(*pair.true_xy.T, c="lime", s=18, label="true")
    for i, (method, xy) in enumerate(pair.predicted.items()):
        target_ax.scatter(*xy.T, marker=MARKERS[i % len(MARKERS)], s=28, label=method)
    target_ax.set_title(f"target {result.items[pair.target].image_id}", fontsize=9)
    target_ax.legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.axis("off")
