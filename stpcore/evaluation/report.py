"""Phase-3 reports: the results table (Markdown and CSV, beside the paper's Table 1) and the trade-off sweep's
CSV and plot. Files are written atomically."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stpcore.evaluation.results import MethodResult, SweepPoint, worst_case
from stpcore.media import atomic_path

# The paper's Table 1 (top-1 % up, F1 down, cMAP % down); for orientation only: different data and runs.
PAPER_RESULTS: dict[str, list[tuple[str, float, float, float]]] = {
    "hmdb51": [
        ("raw video", 51.44, 0.673, 75.58),
        ("SPAct (prior best)", 48.56, 0.642, 73.78),
        ("STPrivacy", 50.73, 0.613, 72.48),
    ],
    "ucf101": [
        ("raw video", 84.20, 0.684, 76.62),
        ("SPAct (prior best)", 78.40, 0.651, 75.29),
        ("STPrivacy", 82.55, 0.634, 73.79),
    ],
}
_DATASET_NAMES = {"hmdb51": "VP-HMDB51", "ucf101": "VP-UCF101"}


def paper_table(dataset: str = "hmdb51") -> list[dict[str, Any]]:
    """The paper's Table 1 rows for "hmdb51" (VP-HMDB51) or "ucf101" (VP-UCF101): dicts with method,
    top1 (%), f1 (0-1), cmap (%). For orientation only: different data, splits and runs."""
    if dataset not in PAPER_RESULTS:
        raise ValueError(f"dataset must be one of {sorted(PAPER_RESULTS)}, got {dataset!r}")
    return [{"method": m, "top1": t, "f1": f, "cmap": c} for m, t, f, c in PAPER_RESULTS[dataset]]


def _fmt(value: float, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "f1":
        return f"{value:.3f}".replace("0.", ".", 1) if value < 1 else f"{value:.3f}"
    return f"{value:.2f}"


def results_table(results: Sequence[MethodResult], dataset: str | None = None) -> tuple[str, str]:
    """Our results shaped like the paper's Table 1, plus the paper's numbers as a separate block.

    Args:
        results: the methods' results.
        dataset: "hmdb51" or "ucf101" to show that column of the paper; None shows both.

    Returns:
        (markdown, csv) text. The CSV has a ``source`` column: "ours" rows, then "paper" rows.
    """
    datasets = [dataset] if dataset is not None else list(PAPER_RESULTS)
    lines = ["## Phase 3: fresh recognizers on transformed videos", "",
             "| method | top-1 (%) ↑ | F1 ↓ | cMAP (%) ↓ | kept | test videos | with privacy labels |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.method} | {_fmt(r.top1, 'pct')} | {_fmt(r.f1, 'f1')} | {_fmt(r.cmap, 'pct')} | "
                     f"{r.kept_fraction:.3f} | {r.num_test_videos} | {r.num_privacy_videos} |")
    notes = [f"- {r.method}: {r.note}" for r in results if r.note]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += attackers_section(results)
    epochs = sorted({r.epochs for r in results})
    lines += ["", f"Recognizers trained for {', '.join(map(str, epochs)) or '?'} epoch(s); top-1 averages the "
              f"softmax over each test video's views; cMAP and F1 (threshold 0.5) over videos with privacy labels.",
              "", "## Paper (Table 1), for orientation; different data", "",
              "| method | " + " | ".join(f"{_DATASET_NAMES[d]} top-1 / F1 / cMAP" for d in datasets) + " |",
              "|---|" + "---|" * len(datasets)]
    for i, (method, *_rest) in enumerate(PAPER_RESULTS["hmdb51"]):
        cells = []
        for d in datasets:
            _, t, f, c = PAPER_RESULTS[d][i]
            cells.append(f"{t:.2f} / {_fmt(f, 'f1')} / {c:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names = _attacker_names(results)
    raw = _raw(results)
    writer.writerow(["source", "dataset", "method", "top1", "f1", "cmap", "kept_fraction", "test_videos",
                     "privacy_videos", "seconds", "note", *[f"cmap_{n}" for n in names], "worst_drop",
                     "best_attacker"])
    for r in results:
        worst = worst_case(raw, r) if raw is not None and r is not raw else None
        writer.writerow(["ours", dataset or "", r.method, _csv_num(r.top1), _csv_num(r.f1), _csv_num(r.cmap),
                         _csv_num(r.kept_fraction), r.num_test_videos, r.num_privacy_videos, r.seconds, r.note,
                         *[_csv_num(r.attackers[n]["cmap"]) if n in r.attackers else "" for n in names],
                         _csv_num(worst["worst_drop"]) if worst else "", worst["best_attacker"] if worst else ""])
    for d in datasets:
        for row in paper_table(d):
            writer.writerow(["paper", d, row["method"], row["top1"], row["f1"], row["cmap"], "", "", "", "",
                             "for orientation; different data", *[""] * len(names), "", ""])
    return markdown, buf.getvalue()


def _attacker_names(results: Sequence[MethodResult]) -> list[str]:
    names: list[str] = []
    for r in results:
        names += [n for n in r.attackers if n not in names]
    return names


def _raw(results: Sequence[MethodResult]) -> MethodResult | None:
    return next((r for r in results if r.method == "raw"), None)


def attackers_section(results: Sequence[MethodResult]) -> list[str]:
    """Markdown lines: every attacker's cMAP, F1 and AP per attribute for every method, its drop from raw video,
    then per method the worst-case drop (the best cMAP on raw video minus the best on the method's), the best
    attacker and the highest AP per attribute on the transformed video."""
    names = _attacker_names(results)
    if not names:
        return []
    first = next(r for r in results if r.attackers)
    attrs = list(next(iter(first.attackers.values()))["ap"])
    raw = _raw(results)
    lines = ["", "## Privacy attackers", "",
             "Each attacker is trained on the method's transformed training videos and tested on its transformed "
             "test videos. drop = the attacker's cMAP on raw video minus on the method's (points); the raw rows "
             "show each attacker's strength.", "",
             "| method | attacker | cMAP (%) | F1 | " + " | ".join(f"AP {a}" for a in attrs) + " | drop |",
             "|---|---|---|---|" + "---|" * len(attrs) + "---|"]
    for r in results:
        for n in names:
            if n not in r.attackers:
                continue
            a = r.attackers[n]
            drop = raw.attackers[n]["cmap"] - a["cmap"] if raw is not None and n in raw.attackers else math.nan
            lines.append(f"| {r.method} | {n} | {_fmt(a['cmap'], 'pct')} | {_fmt(a['f1'], 'f1')} | "
                         + " | ".join(_fmt(100 * a["ap"][k], "pct") for k in attrs)
                         + f" | {'—' if r is raw else _fmt(drop, 'pct')} |")
    if raw is not None:
        lines += ["", "Worst case over the attackers (the best attack: raw video's best cMAP minus the best on "
                  "this output, and the attacker reaching it; the highest AP per attribute on the transformed "
                  "video):", "",
                  "| method | worst-case drop | best attacker | " + " | ".join(f"max AP {a}" for a in attrs) + " |",
                  "|---|---|---|" + "---|" * len(attrs)]
        for r in results:
            if r is raw or not r.attackers:
                continue
            w = worst_case(raw, r)
            lines.append(f"| {r.method} | {_fmt(w['worst_drop'], 'pct')} | {w['best_attacker'] or 'n/a'} | "
                         + " | ".join(_fmt(100 * w["max_ap"][k], "pct") for k in attrs) + " |")
    return lines


def _csv_num(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6g}"


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_results(results: Sequence[MethodResult], out_dir: str | os.PathLike,
                  dataset: str | None = None) -> tuple[Path, Path]:
    """Write results.md and results.csv (atomically) into out_dir; returns their paths."""
    markdown, table = results_table(results, dataset)
    out = Path(out_dir)
    return _write_text(out / "results.md", markdown), _write_text(out / "results.csv", table)


def write_sweep(points: Sequence[SweepPoint], out_dir: str | os.PathLike,
                raw: MethodResult | SweepPoint | None = None) -> tuple[Path, Path]:
    """Write sweep.csv and sweep.png (action top-1 against privacy cMAP, points labelled) atomically.

    Args:
        points: the sweep's points.
        out_dir: destination folder.
        raw: a raw-video point drawn (and listed) for reference.

    Returns:
        (csv path, png path).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(raw, MethodResult):
        raw = SweepPoint.from_result(raw)
    rows = list(points) + ([raw] if raw is not None else [])
    out = Path(out_dir)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["setting", "value", "kept_fraction", "top1", "cmap", "f1"])
    for p in rows:
        writer.writerow([p.setting, _csv_num(p.value), _csv_num(p.kept_fraction), _csv_num(p.top1),
                         _csv_num(p.cmap), _csv_num(p.f1)])
    csv_path = _write_text(out / "sweep.csv", buf.getvalue())

    # The object-oriented Agg API: no pyplot, so no global figure state and no display backend.
    fig = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"keep_ratio": ("o-", "C0", "keep ratio (gather)"), "threshold": ("s", "C1", "adaptive threshold"),
              "raw": ("*", "C3", "raw video")}
    for setting, (marker, color, legend) in styles.items():
        group = [p for p in rows if p.setting == setting and not (math.isnan(p.cmap) or math.isnan(p.top1))]
        if setting == "keep_ratio":
            group.sort(key=lambda p: p.value)
        if not group:
            continue
        ax.plot([p.cmap for p in group], [p.top1 for p in group], marker, color=color, label=legend,
                markersize=10 if setting == "raw" else 6)
        for p in group:
            ax.annotate(f"{p.label} (kept {p.kept_fraction:.2f})", (p.cmap, p.top1), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    undefined = [p.label for p in rows if math.isnan(p.cmap) or math.isnan(p.top1)]
    title = "STPrivacy trade-off: action top-1 vs privacy cMAP"
    if undefined:
        title += f"\n(not drawn, undefined metric: {', '.join(undefined)})"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("privacy cMAP (%) ↓  (left: more private)")
    ax.set_ylabel("action top-1 (%) ↑")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    png_path = out / "sweep.png"
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return csv_path, png_path
