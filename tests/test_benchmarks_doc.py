"""BENCHMARKS.md agrees with the committed data: every figure in a table backed by a results file equals its value
in that file, at the precision shown.

How a table names its data: the section (or the paragraph above the table) has a line ``Data:
`benchmarks/results/FILE``` and the table a column ``data`` holding the benchmark's name in that file
(pytest-benchmark JSON), the method or sweep label (the demo's summary.json), the run's name (variants.jsonl,
the last line of that name), the workload's name (benchmarks/ab.py's JSON), or the preprocessing choice or
``short side S: method`` (benchmarks/preprocess_choice.py's JSON). Each other column whose header is in
:data:`COLUMNS` is then compared with the value it names; the first number of the cell counts ("71.4 (−2.9)"
is 71.4), and a cell whose number carries a unit (ms, s) is converted first. Columns not listed are prose.

The worst case changed rule on 2026-12-07 (:func:`stpcore.evaluation.results.worst_case`, now the best attack: the
best cMAP any attacker reaches on raw video minus the best any reaches on the output; before, the smallest
per-attacker drop). The results files recorded before then store the old rule's ``worst_drop``; the columns
``old worst drop`` (and the ``old worst case`` rows) read it, and the ``best-attack drop`` columns (and the ``best
attack`` rows, and the aggregates of a ``(best attack)`` row) are computed here, by ``worst_case``, from the raw
per-attacker cMAPs the files hold: a run stored as drops gets each attacker's cMAP on its output as raw video's
minus its drop (how the drop was computed, against the same raw video). A ``(name)`` after a worst-case figure is
checked against the attacker that gives it.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from stpcore.evaluation.results import MethodResult, worst_case
from stpcore.evaluation.selection import choose

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "BENCHMARKS.md"
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
# A results file whose runs were scored against raw video recorded in another file: decoder_nullspace.py scores in
# the work folder of privacy_methods.py's runs and reads its raw.json, which privacy_methods.py --gather copies into
# its file (test_raw_video_is_the_runs_own checks that the runs agree with it).
RAW_VIDEO_FROM = {"decoder-nullspace.json": "privacy-methods-intel.json"}
TARGET, ACTION_MARGIN = 15.0, 10.0  # the demo's targets (benchmarks/privacy_methods.py's gather uses the same)


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
    "vit drop": lambda r: r["drops"]["vit"],
    "stats drop": lambda r: r["drops"]["stats"],
    "best-attack drop": lambda r: r["best_attack_drop"],
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
# header -> value from benchmarks/authors_compile.py's JSON (a model's entry: "authors" or "stpcore")
RELEASE_COLUMNS = {
    **COMPILE_OPTION_COLUMNS,
    "eager ms": lambda r: r["eager_ms"],
    "compiled ms": lambda r: r["compiled_ms"],
}
# header -> value from benchmarks/demo_attackers.py's JSON (an attacker's scores on one method)
ATTACKER_COLUMNS = {
    "cMAP %": lambda r: r["cmap"],
    "F1": lambda r: r["f1"],
    "drop": lambda r: r["drop"],
    "skin AP": lambda r: 100 * r["ap"]["skin_color"],
}
# header -> value of a run scored against every attacker (selection_seeds.py and privacy_methods.py share these);
# "old worst drop" is the smallest per-attacker drop the file recorded, "best-attack drop" today's worst case
DROP_COLUMNS = {
    "top-1 %": lambda r: r["top1"],
    "old worst drop": lambda r: r["worst_drop"],
    "best-attack drop": lambda r: r["best_attack_drop"],
    "vit drop": lambda r: r["drops"]["vit"],
    "frame_cnn drop": lambda r: r["drops"]["frame_cnn"],
    "stats drop": lambda r: r["drops"]["stats"],
}
# header -> value from benchmarks/selection_seeds.py's runs (a seed's final or selected model on the test split, or
# "seed S epoch E": a candidate as the selection scored it on the validation part; chosen: 1 or 0)
SELECTION_COLUMNS = {
    **DROP_COLUMNS,
    "action loss": lambda r: r["action_loss"],
    "validation top-1 %": lambda r: r["top1"],
    "chosen then": lambda r: r["chosen_then"],
    "chosen today": lambda r: r["chosen_today"],
}
# header -> value from benchmarks/privacy_methods.py --gather: "<method> seed <s>" (a run), "<method>" (its summary as
# recorded, old rule) and "<method> (best attack)" (the same summary under today's rule); from
# benchmarks/decoder_nullspace.py --gather: "<run>" and "<prefix>_s<lo>-<hi><suffix>" (+ " (best attack)") over seeds
METHOD_COLUMNS = {
    **DROP_COLUMNS,
    "top-1 vs raw": lambda r: r["top1_vs_raw"],
    "skin AP": lambda r: 100 * r["ap"]["vit"]["skin_color"],
    "mean worst drop": lambda r: r["worst_drop_mean"],
    "std": lambda r: r["worst_drop_std"],
    "seeds at 15": lambda r: r["seeds_at_target"],
    "seeds within 10": lambda r: r["seeds_action_kept"],
    "both": lambda r: r["seeds_both"],
    "lowest": lambda r: r["worst_drop_min"],
    "highest": lambda r: r["worst_drop_max"],
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
           **COMPILE_OPTION_COLUMNS, **RELEASE_COLUMNS, **ATTACKER_COLUMNS, **SELECTION_COLUMNS, **METHOD_COLUMNS,
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


def _best_attack(raw_attackers: dict, run: dict) -> dict:
    """Today's worst case of a run stored as per-attacker drops against raw video (raw_attackers: {name: {"cmap"}}):
    :func:`worst_case` on each attacker's cMAP on the output, raw video's minus the drop."""
    out = {a: {"cmap": raw_attackers[a]["cmap"] - d, "ap": run.get("ap", {}).get(a, {})}
           for a, d in run["drops"].items()}
    return worst_case(SimpleNamespace(attackers=raw_attackers), SimpleNamespace(attackers=out))


def _with_best_attack(run: dict, raw_attackers: dict) -> dict:
    w = _best_attack(raw_attackers, run)
    return dict(run, best_attack_drop=w["worst_drop"], best_attack_by=w["best_attacker"])


def summary(runs: list[dict], key: str) -> dict:
    """What benchmarks/privacy_methods.py's gather records over a method's seeds, for the worst case in ``key``
    ("worst_drop": the file's, old rule; "best_attack_drop": today's), with the seeds that meet both targets."""
    drops = [r[key] for r in runs]
    kept = [r["top1_vs_raw"] >= -ACTION_MARGIN for r in runs]
    return {"seeds": len(runs), "worst_drop_mean": statistics.mean(drops),
            "worst_drop_std": statistics.stdev(drops) if len(drops) > 1 else 0.0,
            "worst_drop_min": min(drops), "worst_drop_max": max(drops),
            "seeds_at_target": sum(d >= TARGET for d in drops), "seeds_action_kept": sum(kept),
            "seeds_both": sum(d >= TARGET and k for d, k in zip(drops, kept, strict=True)),
            "top1_vs_raw_mean": statistics.mean(r["top1_vs_raw"] for r in runs)}


def _seed_groups(runs: dict) -> dict:
    """decoder_nullspace.py's runs ("base_s3 nullspace6") over their seeds: {"base_s0-4 nullspace6": [runs]}."""
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for name, run in runs.items():
        found = re.fullmatch(r"(\w+?)_s(\d+)(.*)", name)
        if found:
            groups.setdefault((found.group(1), found.group(3)), {})[int(found.group(2))] = run
    return {f"{prefix}_s{min(seeds)}-{max(seeds)}{suffix}": [seeds[s] for s in sorted(seeds)]
            for (prefix, suffix), seeds in groups.items() if len(seeds) > 1}


def _selection_candidates(run: dict) -> dict:
    """A selection_seeds.py run's candidates as its selection scored them on the validation part (attackers vit and
    stats), with today's worst case and the candidate today's rule (:func:`choose`) would pick."""
    sel = run["selection"]
    raw = SimpleNamespace(attackers={a: {"cmap": c} for a, c in sel["raw"]["cmap"].items()})
    entries, today = {}, []
    for cand in sel["candidates"]:
        out = SimpleNamespace(attackers={a: {"cmap": c, "ap": {}} for a, c in cand["cmap"].items()})
        w = worst_case(raw, out)
        today.append({"top1": cand["top1"], "worst_drop": w["worst_drop"]})
        epoch = int(re.search(r"epoch(\d+)", cand["path"]).group(1))
        entries[f"seed {run['seed']} epoch {epoch}"] = dict(cand, best_attack_drop=w["worst_drop"],
                                                            best_attack_by=w["best_attacker"])
    picked, _ = choose(today, sel["raw"]["top1"], sel["target"])
    for i, entry in enumerate(entries.values()):
        entry["chosen_then"] = int(i == sel["chosen"]["index"])
        entry["chosen_today"] = int(i == picked)
    return entries


@functools.cache
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
        raw = json.loads((path.parent / RAW_VIDEO_FROM[path.name]).read_text())["raw"]["attackers"]
        entries = {name: _with_best_attack(run, raw) for name, run in data["runs"].items()}
        for name, runs in _seed_groups(entries).items():
            entries[name] = summary(runs, "worst_drop")
            entries[f"{name} (best attack)"] = summary(runs, "best_attack_drop")
        return "methods", entries
    if "runs" in data and "selection" in data["runs"][0]:  # benchmarks/selection_seeds.py, gathered
        # No best-attack figure on the test split: these runs recorded only drops there, not raw video's cMAPs.
        entries = {f"seed {r['seed']} {k}": dict(r[k], action_loss=r[k]["raw_top1"] - r[k]["top1"])
                   for r in data["runs"] for k in ("final", "selected")}
        for r in data["runs"]:
            entries.update(_selection_candidates(r))
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
            runs = [_with_best_attack(r, data["raw"]["attackers"]) for r in method["runs"]]
            entries[name] = dict(method, seeds_both=summary(runs, "worst_drop")["seeds_both"])
            entries[f"{name} (best attack)"] = summary(runs, "best_attack_drop")
            entries.update({f"{name} seed {r['seed']}": r for r in runs})
        return "methods", entries
    if "probes" in data:  # benchmarks/leak_probes.py --gather
        return "probes", data["probes"]
    if "worst_case" in data:
        # benchmarks/demo_attackers.py: "<method> / <attacker>", "<method> / old worst case" (as recorded) and
        # "<method> / best attack" (today's rule, from the attackers' cMAPs)
        raw = {a: r["cmap"] for a, r in data["results"][0]["attackers"].items()}
        entries = {f"{r['method']} / {a}": dict(s, drop=raw[a] - s["cmap"]) for r in data["results"]
                   for a, s in r["attackers"].items()}
        entries.update({f"{m} / old worst case": {"drop": w["worst_drop"], "best_attack_by": w["best_attacker"]}
                        for m, w in data["worst_case"].items()})
        results = [MethodResult(**r) for r in data["results"]]
        for r in results[1:]:
            w = worst_case(results[0], r)
            entries[f"{r.method} / best attack"] = {"drop": w["worst_drop"], "best_attack_by": w["best_attacker"]}
        return "attackers", entries
    if "release_sha256" in data:  # benchmarks/authors_compile.py
        return "release", data["models"]
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
    raw = entries.get("raw")
    if raw and raw.get("attackers"):  # a demo run's attackers (vit and stats): each one's drop, and today's worst case
        for name, r in list(entries.items()):
            if name != "raw" and r.get("attackers"):
                w = worst_case(MethodResult(**raw), MethodResult(**r))
                entries[name] = dict(r, drops=w["drops"], best_attack_drop=w["worst_drop"],
                                     best_attack_by=w["best_attacker"])
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
            "benchmarks/results/cpu-compile-options.json", "benchmarks/results/amx-compile-options.json",
            "benchmarks/results/cpu-runtimes-amx.json", "benchmarks/results/cpu-runtimes-amx-rerun.json",
            "benchmarks/results/demo-attackers.json", "benchmarks/results/privacy-methods.json",
            "benchmarks/results/cpu-stream.json", "benchmarks/results/demo-sweep/summary.json",
            "benchmarks/results/demo-machines/intel-avx512.json",
            "benchmarks/results/demo-machines/intel-avx2-forced.json",
            "benchmarks/results/demo-machines/amd-avx512.json", "benchmarks/results/demo-machines/amd-avx2.json",
            "benchmarks/results/privacy-methods-intel.json", "benchmarks/results/leak-probes.json",
            "benchmarks/results/decoder-nullspace.json",
            "benchmarks/results/privacy-methods-amd-avx2.json",
            "benchmarks/results/authors-compile-1thread.json",
            "benchmarks/results/authors-compile-2threads.json"} <= files, files
    assert len(CLAIMS) > 100


@pytest.mark.parametrize("path, line, name, header, cell", CLAIMS,
                         ids=[f"L{c[1]}-{c[2]}-{c[3]}" for c in CLAIMS])
def test_every_figure_equals_its_data(path, line, name, header, cell):
    kind, entries = _load(ROOT / path)
    assert name in entries, f"BENCHMARKS.md:{line}: {name!r} is not in {path}"
    columns = {"bench": BENCH_COLUMNS, "demo": DEMO_COLUMNS, "variants": VARIANT_COLUMNS,
               "ab": AB_COLUMNS, "preprocess": PREPROCESS_COLUMNS,
               "bench_extra": COMPILE_OPTION_COLUMNS,
               "release": RELEASE_COLUMNS,
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
    named = re.search(r"\((\w+)\)", cell)
    if named and header in ("best-attack drop", "drop"):  # "11.67 (frame_cnn)": the attacker that gives it
        assert entries[name].get("best_attack_by") == named.group(1), (
            f"BENCHMARKS.md:{line}: {header} of {name} names {named.group(1)}, but the worst case is "
            f"{entries[name].get('best_attack_by')!r}'s")


def test_raw_video_is_the_runs_own():
    """The best-attack figures take each attacker's cMAP on a run's output as raw video's minus its drop: that holds
    only if the drops were computed against the raw video the file records. Where the file records the ViT's cMAP
    on the output (every run), raw video's ViT cMAP minus the ViT's drop must give it; a file that borrows raw video
    (RAW_VIDEO_FROM) must also hold the lender's runs it shares to the same drops."""
    for name in ("privacy-methods.json", "privacy-methods-intel.json", "privacy-methods-amd-avx2.json",
                 "decoder-nullspace.json"):
        data = json.loads((RESULTS / name).read_text())
        raw_file = RESULTS / RAW_VIDEO_FROM.get(name, name)
        raw = json.loads(raw_file.read_text())["raw"]["attackers"]
        runs = (data["runs"] if name in RAW_VIDEO_FROM else
                {f"{m} seed {r['seed']}": r for m, method in data["methods"].items() for r in method["runs"]})
        for run_name, run in runs.items():
            assert math.isclose(raw["vit"]["cmap"] - run["drops"]["vit"], run["cmap"], abs_tol=1e-9), (name, run_name)
            assert set(run["drops"]) == set(raw), (name, run_name)
        if name in RAW_VIDEO_FROM:
            lender = json.loads(raw_file.read_text())["methods"]["base"]["runs"]
            for r in lender:
                assert data["runs"][f"base_s{r['seed']}"]["drops"] == r["drops"], r["seed"]


def test_summaries_follow_the_gather():
    """:func:`summary`, which gives the best-attack aggregates, reproduces the old-rule summaries
    benchmarks/privacy_methods.py recorded from the same runs."""
    for name in ("privacy-methods.json", "privacy-methods-intel.json", "privacy-methods-amd-avx2.json"):
        data = json.loads((RESULTS / name).read_text())
        assert (data["target"], data["action_margin"]) == (TARGET, ACTION_MARGIN)
        for method_name, method in data["methods"].items():
            ours = summary(method["runs"], "worst_drop")
            for key in ("seeds", "worst_drop_mean", "worst_drop_std", "seeds_at_target", "seeds_action_kept",
                        "top1_vs_raw_mean"):
                assert math.isclose(ours[key], method[key], abs_tol=1e-9), (name, method_name, key)


def test_selection_rule_reproduces_the_recorded_choice():
    """The "chosen today" column applies :func:`choose` to today's worst case; with the worst case each candidate
    recorded (the old rule) it gives the choice each run made."""
    data = json.loads((RESULTS / "selection-seeds.json").read_text())
    for run in data["runs"]:
        sel = run["selection"]
        picked, _ = choose(sel["candidates"], sel["raw"]["top1"], sel["target"])
        assert picked == sel["chosen"]["index"], run["seed"]


def test_readme_quotes_the_measured_demo_time():
    """The README's demo time is the one BENCHMARKS.md records from a fresh clone."""
    doc = DOC.read_text()
    found = re.search(r"`time make demo` from a fresh clone[^\n]*?: (\d+) min (\d+) s", doc)
    assert found, "BENCHMARKS.md must record `time make demo` from a fresh clone as 'N min S s'"
    readme = README.read_text()
    assert f"{found.group(1)} min {found.group(2)} s" in readme, "README.md must quote the same demo time"
