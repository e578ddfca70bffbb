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
    lines += figures_section(report)
    lines += method_section(report["methods"])
    lines += landmark_section(report["landmarks"])
    lines += calibration_section(report["landmarks"], "phantom landmarks")
    if "timing" in report:
        lines += timing_section(report["timing"])
    lines += crop_section(report["crop_retrieval"])
    if "landmark_retrieval" in report:
        lines += landmark_retrieval_section(report["landmark_retrieval"])
    if "real" in report:
        lines += real_section(report["real"])
    lines += ["## Plots", "", f"![error per landmark]({ERROR_PLOT})", "",
              f"![query/target pairs]({PAIRS_PLOT})", ""]
    return "\n".join(lines)


def pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{100 * value:.{digits}f}"


def num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def figures_section(report: dict[str, Any]) -> list[str]:
    """The headline table: accuracy and time per pair of every method, phantoms and real images."""
    real = report.get("real", {}).get("methods", {})
    timing = report.get("timing", {})
    rows = []
    for name, metrics in report["landmarks"].items():
        o = metrics["overall"]
        row = [name, num(o["median_pct"]), pct(o["success_2pct"]), pct(o["success_5pct"]),
               seconds(timing.get(name, {}).get("seconds_per_pair"))]
        if real:
            r = real[name]["overall"]
            row += [num(r["median_pct"]), pct(r["success_2pct"]), pct(r["success_5pct"]),
                    seconds(real[name]["timing"]["seconds_per_pair"])]
        rows.append(row)
    header = ["method", "phantoms: median % diag", "≤2 % (%)", "≤5 % (%)", "time per pair"]
    if real:
        header += ["real: median % diag", "≤2 % (%)", "≤5 % (%)", "time per pair"]
    return ["## Figures", "", *table(header, rows), "", *speed_lines(report), ""]


def speed_lines(report: dict[str, Any]) -> list[str]:
    """'NAME answers a pair Nx faster than full-resolution NCC' for the first encoder method."""
    first = next((m["name"] for m in report["methods"] if m["kind"] == "encoder"), None)
    lines = []
    for label, timing in (("phantoms", report.get("timing", {})),
                          ("real images", {k: v["timing"] for k, v in report.get("real", {})
                                           .get("methods", {}).items()})):
        if first in timing and "ncc-full" in timing:
            ours, ncc = timing[first]["seconds_per_pair"], timing["ncc-full"]["seconds_per_pair"]
            ratio = ncc / ours
            verdict = f"{ratio:.1f}x faster than" if ratio >= 1 else f"{1 / ratio:.1f}x slower than"
            lines.append(f"- {label}: `{first}` answered a pair {verdict} full-resolution NCC "
                         f"({seconds(ours)} vs {seconds(ncc)} per pair).")
    if lines:
        lines += ["", "Time per pair = preparation per image (an encoder's embedding at every size it "
                  "uses, shared by all pairs of that image) + matching of the pair with all its points; "
                  "CPU wall time on the evaluation machine (see Timing)."]
    return lines


def method_section(methods: Sequence[dict[str, Any]]) -> list[str]:
    rows = [[m["name"], m["kind"], m.get("backbone", "-"), m.get("img_size", "-"), method_setting(m)]
            for m in methods]
    return ["## Methods", "", *table(("method", "kind", "backbone", "input px", "setting"), rows), ""]


def method_setting(method: dict[str, Any]) -> str:
    if "fingerprint" in method:
        if "mode" not in method:
            return str(method["fingerprint"])
        look = ", second looks at 2x/4x (as the resolution allows)" if method.get("second_look") else ""
        return (f"levels {method['mode']}{look}, refine {method['refine']}; "
                f"encoder {method['fingerprint']}")
    if "template_fraction" in method:
        return f"template {100 * method['template_fraction']:.1f} % of the longer side"
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
    return ["Mutual flag (matching back from the answer lands within one coarse cell of the query "
            "point): how often a match is mutual and the mean error (% of diagonal) of mutual and "
            "non-mutual matches:", "",
            *table(("method", "mutual (%)", "mean % diag, mutual", "mean % diag, not mutual"), rows), ""]

CALIBRATION_NOTE = ("Error against the matcher's confidence (the softmax mass near the peak): fixed bins, "
                    "then quartiles of each method's confidences (equal counts). A useful confidence has "
                    "the error falling and the share within 5 % rising from bin to bin.")


def calibration_section(per_method: dict[str, Any], what: str) -> list[str]:
    fixed, quartiles = [], []
    for name, m in per_method.items():
        if "calibration" not in m:
            continue
        for rows, bins, digits in ((fixed, m["calibration"]["fixed"], 2),
                                   (quartiles, m["calibration"]["quartiles"], 4)):
            rows += [[name, f"{b['low']:.{digits}f}-{b['high']:.{digits}f}", b["n"], num(b["median_pct"]),
                      pct(b["success_2pct"]), pct(b["success_5pct"])] for b in bins]
    if not fixed:
        return []
    header = ("method", "confidence", "n", "median % diag", "≤2 % (%)", "≤5 % (%)")
    return [f"## Confidence calibration ({what})", "", CALIBRATION_NOTE, "", "Fixed bins:", "",
            *table(header, fixed), "", "Quartiles:", "", *table(header, quartiles), ""]


def timing_section(timing: dict[str, Any]) -> list[str]:
    rows = [[name, seconds(t["fit_seconds_per_image"]), seconds(t["locate_seconds_per_pair"]),
             seconds(t["seconds_per_pair"])] for name, t in timing.items()]
    return ["## Timing (phantoms)", "",
            *table(("method", "preparation per image", "matching per pair", "time per pair"), rows), ""]


def crop_section(crop: dict[str, Any]) -> list[str]:
    rows = [[name, f"{100 * r['top1']:.1f}", f"{100 * r['chance']:.1f}", int(r["groups"]),
             int(r["group_size"])] for name, r in crop.items()]
    return ["## Crop retrieval (the ACE paper's protocol)", "",
            "Find each image among its group from a random crop (side 30-80 % of the image side, "
            "resized to the input size), global embeddings, cosine top-1.", "",
            *table(("method", "top-1 (%)", "chance (%)", "groups", "group size"), rows), ""]


def landmark_retrieval_section(retrieval: dict[str, Any]) -> list[str]:
    first = next(iter(retrieval.values()))
    methods = list(retrieval)
    rows = [[name, pct(r["share"]), pct(r["share_cell_centre"]), r["n_queries"], r["n_hits"]]
            for name, r in retrieval.items()]
    landmarks = list(first["per_landmark"])
    per = [[lm, *(pct(retrieval[m]["per_landmark"].get(lm, {}).get("share")) for m in methods)]
           for lm in landmarks]
    return ["## Landmark retrieval over an index", "",
            f"Each landmark of each image is searched among the images of the other subjects: exact "
            f"cosine search of its coarse vector over every coarse cell, the best cell per image, the "
            f"top {first['k']} images; each hit is then located with the matcher (coarse to fine) and "
            f"counts when it lies within {first['threshold_pct']:g} % of the diagonal of the same "
            "landmark in that image. 'cell centre' places the hit at its retrieved coarse cell instead.",
            "", *table(("method", f"share of top-{first['k']} hits (%)", "cell centre (%)", "queries",
                        "hits"), rows), "", "Per landmark (%):", "", *table(("landmark", *methods), per), ""]


def real_section(real: dict[str, Any]) -> list[str]:
    methods = real["methods"]
    kinds = list(next(iter(methods.values()))["per_kind"])
    overall = [[name, kind, *summary_cells(m["per_kind"][kind])] for name, m in methods.items()
               for kind in kinds]
    overall += [[name, "all", *summary_cells(m["overall"])] for name, m in methods.items()]
    images = [[i["name"], i["source"], i["modality"], f"{i['size'][0]}x{i['size'][1]}", i["note"] or "-"]
              for i in real["images"]]
    names = [i["name"] for i in real["images"]]
    per_image = [[image, kind, *(num(methods[m]["per_image"][image][kind]["median_pct"]) for m in methods)]
                 for image in names for kind in kinds]
    return ["## Real images under known warps", "",
            f"{len(names)} real images, {real['warps_per_kind']} warp(s) per image and kind. affine: "
            "rotation ±10°, scale 0.9-1.1, shear ±0.05 rad, shift ±5 %; elastic: half that affine plus a "
            "smooth random displacement field (low-frequency sinusoids, up to ~4 % of the shorter side). "
            "Points on a grid of the warped image, mapped exactly to the original through the known "
            "map; the original's points are located in the warped copy; errors in its pixels.", "",
            *table(("image", "source", "modality", "size", "note"), images), "",
            *skipped_lines(real["skipped"]),
            *table(("method", "warp", *SUMMARY_HEADER), overall), "",
            "Median error per image, % of the diagonal:", "",
            *table(("image", "warp", *methods), per_image), "",
            *calibration_section(methods, "real images")]


def skipped_lines(skipped: Sequence[dict[str, str]]) -> list[str]:
    if not skipped:
        return []
    groups: dict[str, list[str]] = {}
    for s in skipped:
        key = s["reason"] if not s["reason"].startswith(("the same image", "another encoding")) else \
            "the same acquisition as a kept image (another encoding or a crop)"
        groups.setdefault(key, []).append(s["name"])
    rows = [[reason, len(files), ", ".join(files[:6]) + (" ..." if len(files) > 6 else "")]
            for reason, files in groups.items()]
    return ["Files with pixel data that were skipped (report.json lists each):", "",
            *table(("reason", "files", "examples"), rows), ""]


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
