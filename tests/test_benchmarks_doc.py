"""BENCHMARKS.md agrees with the committed data: every figure in a table backed by a results file equals its value
in that file, at the precision shown.

How a table names its data: the section (or the paragraph above the table) has a line ``Data:
`benchmarks/results/FILE``` and the table a column ``data`` holding the benchmark's name in that file
(pytest-benchmark JSON), the method or sweep label (the demo's summary.json), the run's name (variants.jsonl,
the last line of that name), the workload's name (benchmarks/ab.py's JSON), or the preprocessing choice or
``short side S: method`` (benchmarks/preprocess_choice.py's JSON). Each other column whose header is in
:data:`COLUMNS` is then compared with the value it names; the first number of the cell counts ("71.4 (−2.9)"
is 71.4), and a cell whose number carries a unit (ms, s) is converted first. Columns not listed are prose.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "BENCHMARKS.md"
README = ROOT / "README.md"


def _bench_extra(key: str):
    return lambda entry: entry["extra_info"].get(key)


def _median_seconds(entry) -> float:
    return entry["stats"]["median"]


# header -> value from a pytest-benchmark entry
BENCH_COLUMNS = {
    "median": _median_seconds,
    "clips/s": _bench_extra("clips_per_s"),
    "peak MiB": _bench_extra("peak_mib"),
    "first call MiB": _bench_extra("peak_mib_default_first"),
    "later calls MiB": _bench_extra("peak_mib_default_later"),
    "speedup vs fp32": _bench_extra("speedup_vs_fp32"),
    "keep agreement": _bench_extra("keep_agreement"),
    "GFLOP/s": _bench_extra("gflop_per_s"),
    "frames/s": _bench_extra("frames_per_s"),
    "windows per clip": _bench_extra("windows"),
    "speedup vs eager": _bench_extra("speedup_vs_eager"),
    "compile s": _bench_extra("compile_s"),
}
# header -> value from a demo result (summary.json "results" or "sweep" entry)
DEMO_COLUMNS = {
    "top-1 %": lambda r: r["top1"],
    "F1": lambda r: r["f1"],
    "cMAP %": lambda r: r["cmap"],
    "kept": lambda r: r["kept_fraction"],
}
# header -> value from a variants.jsonl run
VARIANT_COLUMNS = {
    "top-1 %": lambda r: r["stprivacy"]["top1"],
    "cMAP %": lambda r: r["stprivacy"]["cmap"],
    "skin AP": lambda r: r["stprivacy"]["ap"]["skin_color"],
    "nudity AP": lambda r: r["stprivacy"]["ap"]["nudity"],
}
# header -> value from a benchmarks/ab.py workload
AB_COLUMNS = {
    "new/old speed": lambda r: r["median_ratio"],
}
# header -> value from benchmarks/preprocess_choice.py's JSON: a choice's keep masks, or a phase-3 result
PREPROCESS_COLUMNS = {
    "same decision": lambda r: r["same_decision"],
    "Jaccard": lambda r: r["jaccard"],
    "top-1 %": lambda r: r["top1"],
    "cMAP %": lambda r: r["cmap"],
}
# header -> value from benchmarks/compile_options.py's JSON (a setting's entry)
COMPILE_OPTION_COLUMNS = {
    "speedup vs eager": lambda r: r["speedup_vs_eager"],
    "keep agreement": lambda r: r["keep_agreement"],
    "compile s": lambda r: r["compile_s"],
}
# header -> value from benchmarks/demo_attackers.py's JSON (an attacker's scores on one method)
ATTACKER_COLUMNS = {
    "cMAP %": lambda r: r["cmap"],
    "F1": lambda r: r["f1"],
    "drop": lambda r: r["drop"],
    "skin AP": lambda r: 100 * r["ap"]["skin_color"],
}
# header -> value of a run scored against every attacker (selection_seeds.py and privacy_methods.py share these)
DROP_COLUMNS = {
    "top-1 %": lambda r: r["top1"],
    "worst drop": lambda r: r["worst_drop"],
    "vit drop": lambda r: r["drops"]["vit"],
    "frame_cnn drop": lambda r: r["drops"]["frame_cnn"],
    "stats drop": lambda r: r["drops"]["stats"],
}
# header -> value from benchmarks/selection_seeds.py's runs (a seed's final or selected model on the test split)
SELECTION_COLUMNS = {
    **DROP_COLUMNS,
    "action loss": lambda r: r["action_loss"],
}
# header -> value from benchmarks/privacy_methods.py --gather: "<method> seed <s>" (a run) and "<method>" (its summary)
METHOD_COLUMNS = {
    **DROP_COLUMNS,
    "top-1 vs raw": lambda r: r["top1_vs_raw"],
    "skin AP": lambda r: 100 * r["ap"]["vit"]["skin_color"],
    "mean worst drop": lambda r: r["worst_drop_mean"],
    "std": lambda r: r["worst_drop_std"],
    "seeds at 15": lambda r: r["seeds_at_target"],
    "seeds within 10": lambda r: r["seeds_action_kept"],
    "mean top-1 vs raw": lambda r: r["top1_vs_raw_mean"],
}
# header -> value from benchmarks/bench_stream.py's JSON: "<model>" (its summary) and "<model> @ <fps>" (a rate tried)
STREAM_COLUMNS = {
    "windows": lambda r: r["windows"],
    "s per chunk": lambda r: r["seconds_per_chunk"],
    "estimated fps": lambda r: r["estimated_fps"],
    "held fps": lambda r: r["max_fps_without_drops"],
    "fps": lambda r: r["fps"],
    "frames in": lambda r: r["frames_in"],
    "dropped": lambda r: r["frames_dropped"],
    "latency p50 s": lambda r: r["latency"]["p50"],
    "latency p95 s": lambda r: r["latency"]["p95"],
    "latency max s": lambda r: r["latency"]["max"],
}
# header -> value from benchmarks/leak_probes.py --gather (a probe, by name; APs shown in %)
PROBE_COLUMNS = {
    "top-1 %": lambda r: r["top1"],
    "cMAP %": lambda r: r["cmap"],
    **{f"{short} AP": (lambda a: lambda r: 100 * r["ap"][a])(attribute)
       for short, attribute in (("skin", "skin_color"), ("face", "face"), ("gender", "gender"), ("nudity", "nudity"),
                                ("relationship", "relationship"))},
}
COLUMNS = {**BENCH_COLUMNS, **DEMO_COLUMNS, **VARIANT_COLUMNS, **AB_COLUMNS, **PREPROCESS_COLUMNS,
           **COMPILE_OPTION_COLUMNS, **ATTACKER_COLUMNS, **SELECTION_COLUMNS, **METHOD_COLUMNS,
           **STREAM_COLUMNS, **PROBE_COLUMNS}

NUMBER = re.compile(r"[-−+]?(?:\d+(?:\.\d+)?|\.\d+)")


def parse_tables(text: str) -> list[dict]:
    """Every markdown table with the nearest ``Data:`` file above it: {"data": path or None, "header": [...],
    "rows": [[cells]], "line": n}."""
    tables, data, lines = [], None, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            data = None  # a Data: line holds for its section
        found = re.search(r"^Data: `(benchmarks/results/[^`]+)`", line)
        if found:
            data = found.group(1)
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|$", lines[i + 1]):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows, j = [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append([c.strip() for c in lines[j].strip("|").split("|")])
                j += 1
            tables.append({"data": data, "header": header, "rows": rows, "line": i + 1})
            i = j
            continue
        i += 1
    return tables


def cell_value(cell: str) -> tuple[float, int, str] | None:
    """(value, decimals shown, unit) of a cell's first number, or None."""
    text = cell.replace("**", "").replace("*", "")
    found = NUMBER.search(text)
    if not found:
        return None
    raw = found.group(0).replace("−", "-")
    decimals = len(raw.split(".")[1]) if "." in raw else 0
    unit = text[found.end():].strip().split(" ")[0] if text[found.end():].strip() else ""
    return float(raw), decimals, unit


def _load(path: Path):
    if path.suffix == ".jsonl":
        runs: dict[str, dict] = {}
        for line in path.read_text().splitlines():
            if line.strip():
                run = json.loads(line)
                runs[run["name"]] = run  # the last line of a name is its latest run
        return "variants", runs
    data = json.loads(path.read_text())
    if "workloads" in data:
        return "ab", data["workloads"]
    if isinstance(data.get("runs"), dict):  # benchmarks/decoder_nullspace.py --gather: runs by name
        return "methods", data["runs"]
    if "runs" in data and "selection" in data["runs"][0]:  # benchmarks/selection_seeds.py, gathered
        entries = {f"seed {r['seed']} {k}": dict(r[k], action_loss=r[k]["raw_top1"] - r[k]["top1"])
                   for r in data["runs"] for k in ("final", "selected")}
        return "selection", entries
    if "models" in data and "seconds_per_rate" in data:  # benchmarks/bench_stream.py
        entries = {}
        for name, model in data["models"].items():
            entries[name] = model
            entries.update({f"{name} @ {r['fps']:g}": r for r in model["runs"]})
        return "stream", entries
    if "methods" in data and "target" in data:  # benchmarks/privacy_methods.py --gather
        entries = {}
        for name, method in data["methods"].items():
            entries[name] = method
            entries.update({f"{name} seed {r['seed']}": r for r in method["runs"]})
        return "methods", entries
    if "probes" in data:  # benchmarks/leak_probes.py --gather
        return "probes", data["probes"]
    if "worst_case" in data:  # benchmarks/demo_attackers.py: "<method> / <attacker>" and "<method> / worst case"
        raw = {a: r["cmap"] for a, r in data["results"][0]["attackers"].items()}
        entries = {f"{r['method']} / {a}": dict(s, drop=raw[a] - s["cmap"]) for r in data["results"]
                   for a, s in r["attackers"].items()}
        entries.update({f"{m} / worst case": {"drop": w["worst_drop"]} for m, w in data["worst_case"].items()})
        return "attackers", entries
    if "settings" in data:  # benchmarks/compile_options.py
        return "bench_extra", data["settings"]
    if "keep_masks" in data:
        entries = dict(data["keep_masks"]["choices"])
        crop = data.get("phase3_crop_scale")
        if crop:
            entries.update({f"short side {crop['short_side']}: {m}": r for m, r in crop["results"].items()})
        return "preprocess", entries
    if "benchmarks" in data:
        return "bench", {b["name"]: b for b in data["benchmarks"]}
    entries = {r["method"]: r for r in data.get("results", [])}
    entries.update({f"sweep {p['setting']}={p['value']:g}": p for p in data.get("sweep", [])})
    return "demo", entries


def _claims():
    for table in parse_tables(DOC.read_text()):
        if table["data"] is None or "data" not in table["header"] and "run" not in table["header"]:
            continue
        key_col = table["header"].index("data" if "data" in table["header"] else "run")
        for row in table["rows"]:
            name = row[key_col].strip("`* ")
            for col, header in enumerate(table["header"]):
                if header in COLUMNS and col != key_col:
                    yield table["data"], table["line"], name, header, row[col]


CLAIMS = list(_claims())


def test_tables_name_their_data():
    """The doc's data-backed tables are found (a typo in a Data: line would silently drop a table's checks)."""
    files = {c[0] for c in CLAIMS}
    assert {"benchmarks/results/cpu-model.json", "benchmarks/results/cpu-attention.json",
            "benchmarks/results/cpu-inference.json", "benchmarks/results/cpu-int8-bound.json",
            "benchmarks/results/demo/summary.json", "benchmarks/results/demo/variants.jsonl",
            "benchmarks/results/ab-restructure.json", "benchmarks/results/preprocess-choice.json",
            "benchmarks/results/cpu-fullframe.json", "benchmarks/results/cpu-compile.json",
            "benchmarks/results/cpu-compile-options.json",
            "benchmarks/results/demo-attackers.json", "benchmarks/results/privacy-methods.json",
            "benchmarks/results/cpu-stream.json", "benchmarks/results/demo-sweep/summary.json",
            "benchmarks/results/demo-machines/intel-avx512.json",
            "benchmarks/results/demo-machines/intel-avx2-forced.json",
            "benchmarks/results/demo-machines/amd-avx512.json", "benchmarks/results/demo-machines/amd-avx2.json",
            "benchmarks/results/privacy-methods-intel.json", "benchmarks/results/leak-probes.json",
            "benchmarks/results/decoder-nullspace.json",
            "benchmarks/results/privacy-methods-amd-avx2.json"} <= files, files
    assert len(CLAIMS) > 100


@pytest.mark.parametrize("path, line, name, header, cell", CLAIMS,
                         ids=[f"L{c[1]}-{c[2]}-{c[3]}" for c in CLAIMS])
def test_every_figure_equals_its_data(path, line, name, header, cell):
    kind, entries = _load(ROOT / path)
    assert name in entries, f"BENCHMARKS.md:{line}: {name!r} is not in {path}"
    columns = {"bench": BENCH_COLUMNS, "demo": DEMO_COLUMNS, "variants": VARIANT_COLUMNS,
               "ab": AB_COLUMNS, "preprocess": PREPROCESS_COLUMNS,
               "bench_extra": COMPILE_OPTION_COLUMNS,
               "attackers": ATTACKER_COLUMNS, "selection": SELECTION_COLUMNS, "methods": METHOD_COLUMNS,
               "stream": STREAM_COLUMNS, "probes": PROBE_COLUMNS}[kind]
    if header not in columns:
        pytest.fail(f"BENCHMARKS.md:{line}: column {header!r} has no meaning for {path}")
    shown = cell_value(cell)
    if shown is None:
        assert cell.strip() in ("", "-", "—"), f"BENCHMARKS.md:{line}: {header} of {name}: no number in {cell!r}"
        return
    value, decimals, unit = shown
    expected = columns[header](entries[name])
    assert expected is not None, f"BENCHMARKS.md:{line}: {path} has no {header} for {name}"
    scale = {"ms": 1e3, "µs": 1e6, "us": 1e6}.get(unit, 1.0)
    if header in ("top-1 %", "cMAP %") and kind == "demo" or kind in ("attackers", "selection", "methods", "stream") \
            or header in VARIANT_COLUMNS \
            and kind == "variants":
        scale = 1.0
    expected = expected * scale
    tolerance = 0.5 * 10 ** -decimals + 1e-9
    assert math.isclose(value, expected, abs_tol=tolerance) or abs(value - expected) <= tolerance, (
        f"BENCHMARKS.md:{line}: {header} of {name} reads {cell!r}, but {path} has {expected:.6g}")


def test_readme_quotes_the_measured_demo_time():
    """The README's demo time is the one BENCHMARKS.md records from a fresh clone."""
    doc = DOC.read_text()
    found = re.search(r"`time make demo` from a fresh clone[^\n]*?: (\d+) min (\d+) s", doc)
    assert found, "BENCHMARKS.md must record `time make demo` from a fresh clone as 'N min S s'"
    readme = README.read_text()
    assert f"{found.group(1)} min {found.group(2)} s" in readme, "README.md must quote the same demo time"
