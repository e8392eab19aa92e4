"""benchmarks/gpu/run.sh runs once, unattended, on a lent GPU: its plumbing is checked here on CPU. The dry run
plans and collects every step; a fake plan shows a step that overruns its limit loses only itself; the table's
target checks run on made-up results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import harvest  # noqa: E402
import table  # noqa: E402


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_dry_run_plans_every_step_within_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not the calling session's
    env.update(DRY_RUN="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), str(tmp_path)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    budget = re.fullmatch(r"budget: (\d+) s", last)
    assert budget and int(budget.group(1)) <= harvest.BUDGET_S, last
    files = list(tmp_path.iterdir())
    assert len(files) <= 8 and all(f.is_file() and f.name in harvest.OUT_FILES for f in files), files
    log = (tmp_path / "log.txt").read_text()
    kept = [s.name for s in harvest.fit(harvest.default_plan(sys.executable))[0]]
    assert kept[:10] == ["install", "machine", "warm", "bench-policy", "bench-varlen", "bench-tokens",
                         "bench-inference", "bench-phase2", "bench-fullframe", "tests"]
    for step in kept:
        assert f"== {step} " in log, step
        assert f"-- {step}: ok" in log or f"== {step} (limit" in log and "(nothing to plan)" in log, step
    assert "TIMEOUT" not in log and "exit " not in log.split("steps:")[-1]
    # Every benchmark group collects what the targets need, with the SDPA backends pinned one by one.
    for name in ("test_policy_attention_fwd_bwd[paper B32-H6-N392-D64-bf16-triton]",
                 "test_policy_attention_fwd_bwd[paper B32-H6-N392-D64-bf16-sdpa_flash]",
                 "test_policy_attention_fwd_bwd[paper B32-H6-N392-D64-bf16-sdpa_cudnn]",
                 "test_policy_attention_fwd_bwd[paper B32-H6-N392-D64-bf16-sdpa_efficient]",
                 "test_varlen_attention_fwd_bwd[keep272 B32-H6-N392-D64-fp16-sdpa_flash]",
                 "test_select_stage[stage1 N392-k34-triton]",
                 "test_inference_vit_small_b8[masked]", "test_inference_vit_small_b8[auto]",
                 "test_phase2_step_vit_small[reference]", "test_phase2_step_vit_small[auto]",
                 "test_fullframe_frames[vit_small-1280x720]", "test_fullframe_frames[vit_small-320x240]"):
        assert name in log, name
    # The compiled benchmarks (a minute of compiling each) belong to their own steps only: collected in the
    # inference or phase-2 group, they would hold those steps past their limits on the GPU (they skip on CPU).
    for step in ("bench-inference", "bench-phase2"):
        collected = log.split(f"== {step} ")[1].split(f"-- {step}:")[0]
        assert "test_inference_vit_small_b8" in collected or "test_phase2_step_vit_small" in collected, step
        assert "::test_compiled" not in collected, step
    # The test step takes the kernel and model suite (but the sm_90 compile check, which needs no GPU and runs in
    # CI), plus gpu tests elsewhere, and not the rest.
    tests = log.split("== tests ")[1].split("-- tests:")[0]
    assert "tests/kernels/test_compile.py::" not in tests and "tests/kernels/test_policy_attention.py::" in tests
    assert "tests/models/test_checkpoints.py::" in tests
    assert "tests/evaluation/test_protocol.py::test_sweep_on_cuda_bf16" in tests
    assert "tests/training/test_trainer.py::" not in tests
    assert "warm:" in log and "profile: phase-2 step" in log
    # The tile sweep: planned here when the budget keeps it; else its plan must still work (for a manual run).
    if "tiles" in kept:
        assert "tiles: fwd candidates" in log
    else:
        tiles = next(s for s in harvest.default_plan(sys.executable) if s.name == "tiles")
        plan = subprocess.run(tiles.plan_argv, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
        assert plan.returncode == 0 and "tiles: fwd candidates" in plan.stdout, plan.stdout + plan.stderr


FAKE_BENCH = textwrap.dedent(
    """
    import time

    def test_fast_a(benchmark):
        benchmark.group = "fake group"
        benchmark.pedantic(lambda: None, rounds=2, iterations=1)

    def test_fast_b_then(benchmark):
        benchmark.group = "fake group"
        benchmark.pedantic(lambda: None, rounds=2, iterations=1)

    def test_hangs(benchmark):
        benchmark.group = "fake group"
        time.sleep(120)

    def test_fast_c(benchmark):
        benchmark.group = "fake group"
        benchmark.pedantic(lambda: None, rounds=2, iterations=1)
    """
)


def test_a_step_that_overruns_its_limit_loses_only_itself(tmp_path):
    bench = tmp_path / "bench_fake.py"
    bench.write_text(FAKE_BENCH)
    out = tmp_path / "out"
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",
            "--rootdir", str(tmp_path), "--benchmark-only", str(bench)]
    steps = [
        harvest.Step("first", 60, [*base, "-k", "fast_a"], json_into="kernels.json", pytest=True),
        harvest.Step("overruns", 6, [*base, "-k", "fast_b or hangs"], json_into="kernels.json", pytest=True),
        harvest.Step("third", 60, [*base, "-k", "fast_c"], json_into="kernels.json", pytest=True),
    ]
    start = time.perf_counter()
    results = harvest.Harvest(out).run(steps, budget_s=300)
    assert time.perf_counter() - start < 60, "the overrunning step was not killed at its limit"
    assert [r["status"].split()[0] for r in results] == ["ok", "TIMEOUT", "ok"]
    names = [b["name"] for b in json.loads((out / "kernels.json").read_text())["benchmarks"]]
    # The first step's numbers survived, the overrunning step kept what it finished before its limit (pytest
    # writes its JSON on the SIGINT), the third's were added.
    assert names == ["test_fast_a", "test_fast_b_then", "test_fast_c"]
    assert "fake group" in (out / "table.md").read_text()
    log = (out / "log.txt").read_text()
    assert "-- overruns: TIMEOUT after 6 s" in log and log.rstrip().endswith("budget: 126 s")
    assert sorted(p.name for p in out.iterdir()) == ["kernels.json", "log.txt", "table.md"]


def test_the_gpu_test_step_collects_every_module_with_a_gpu_test():
    """The test step names its modules (12 workers collecting the whole suite cost seconds it does not have): each
    module with a `gpu` test must be under one of them."""
    paths = [ROOT / p for p in harvest.TEST_PATHS]
    assert all(p.exists() for p in paths), paths
    for module in (ROOT / "tests").rglob("test_*.py"):
        if re.search(r"^\s*@pytest\.mark\.gpu\b|^pytestmark\b.*\bgpu\b", module.read_text(), re.M):
            assert any(module == p or p in module.parents for p in paths), module


_IGNORES_SIGINT = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(30)"


@pytest.mark.skipif(sys.platform != "linux", reason="process groups")
def test_an_overrun_takes_its_seconds_from_the_steps_after_it(tmp_path):
    """The harvest keeps one deadline (the sum of the limits): a step that outlives its limit (here by the SIGINT
    grace) shortens the next step's limit, and a step with no time left is skipped, so the whole run stays within
    what the device call was given."""
    steps = [harvest.Step("slow", 2, [sys.executable, "-c", _IGNORES_SIGINT]),  # ends ~5 s late (SIGINT grace)
             harvest.Step("next", 8, [sys.executable, "-c", "import time; time.sleep(30)"]),
             harvest.Step("last", 3, [sys.executable, "-c", "print('never')"])]
    results = harvest.Harvest(tmp_path).run(steps, budget_s=300)
    assert [r["status"].split()[0] for r in results] == ["TIMEOUT", "TIMEOUT", "skipped"]
    log = (tmp_path / "log.txt").read_text()
    assert re.search(r"\(next: limit 8 -> [3-7] s", log), log
    assert "never" not in log.split("== last")[-1].split("steps:")[0]


def test_each_pytest_step_ends_a_hung_test_inside_its_own_limit(tmp_path):
    h = harvest.Harvest(tmp_path)
    for step in harvest.default_plan(sys.executable):
        if step.pytest:
            per_test = [int(a.split("=")[1]) for a in h._argv(step) if a.startswith("--timeout=")]
            assert per_test and per_test[0] <= step.limit_s - 5, (step.name, per_test)


def test_steps_run_without_ci_set(tmp_path, monkeypatch):
    """CI=true makes the suite's skips (PyAV, DALI: absent on the GPU machine) collection errors."""
    monkeypatch.setenv("CI", "true")
    steps = [harvest.Step("env", 20, [sys.executable, "-c", "import os; print('CI is', os.environ.get('CI'))"])]
    harvest.Harvest(tmp_path).run(steps)
    assert "CI is None" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("pip_finished", [True, False])
def test_an_install_timeout_stops_the_plan_only_before_pip_finished(tmp_path, pip_finished):
    """A timeout in the import check is a slow machine (the cold first import of torch is inside the step), not a
    broken install; a timeout before pip finished may leave stpcore.kernels unimportable: the plan stops."""
    said = f"print({harvest.PIP_DONE!r}, flush=True); " if pip_finished else ""
    steps = [harvest.Step("install", 2, [sys.executable, "-c", said + "import time; time.sleep(20)"]),
             harvest.Step("machine", 20, [sys.executable, "-c", "print('machine ran')"])]
    results = harvest.Harvest(tmp_path).run(steps)
    log = (tmp_path / "log.txt").read_text()
    if pip_finished:
        assert [r["step"] for r in results] == ["install", "machine"] and results[1]["status"] == "ok"
        assert "install: timed out; going on" in log
    else:
        assert [r["step"] for r in results] == ["install"] and "install failed: the plan stops here" in log


def test_the_install_step_says_when_pip_finished():
    install = harvest.default_plan("python3")[0]
    command = install.argv[-1]
    assert install.name == "install" and f"echo {harvest.PIP_DONE}" in command
    assert command.index("pip install") < command.index(harvest.PIP_DONE) < command.index("import stpcore.kernels")


def test_warm_prints_its_summary_inside_a_shortened_limit(tmp_path):
    """The warm-up's deadline stays 5 s inside its limit when the harvest's deadline shortens the step."""
    warm = next(s for s in harvest.default_plan("python3") if s.name == "warm")
    h = harvest.Harvest(tmp_path)
    assert float(h._argv(warm)[h._argv(warm).index("--deadline") + 1]) <= warm.limit_s - 5
    short = harvest.dataclasses.replace(warm, limit_s=9)
    assert h._argv(short)[h._argv(short).index("--deadline") + 1] == "4"


def test_a_failed_install_stops_the_plan(tmp_path):
    """Without stpcore.kernels every "auto" figure would silently measure the reference code."""
    steps = [harvest.Step("install", 10, [sys.executable, "-c", "raise SystemExit(3)"]),
             harvest.Step("machine", 10, [sys.executable, "-c", "print('never')"])]
    results = harvest.Harvest(tmp_path).run(steps)
    assert [r["step"] for r in results] == ["install"] and results[0]["status"] == "exit 3"
    assert "install failed: the plan stops here" in (tmp_path / "log.txt").read_text()


@pytest.mark.skipif(sys.platform != "linux", reason="process groups and SIGTERM")
def test_stopping_the_harvest_stops_the_running_step(tmp_path):
    """The device call's timeout (SIGTERM) must not leave a step running on the GPU beside a rerun."""
    marker = tmp_path / "step.pid"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "benchmarks" / "gpu")!r})
        import harvest
        harvest.default_plan = lambda py: [harvest.Step("sleeper", 60, ["bash", "-c",
            "echo $$ > {marker}; sleep 60"])]
        raise SystemExit(harvest.main([{str(tmp_path / "out")!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.time() + 30
    while not marker.exists() or not marker.read_text().strip():
        assert time.time() < deadline, "the step did not start"
        time.sleep(0.1)
    step_pid = int(marker.read_text())
    proc.terminate()
    assert proc.wait(timeout=30) == 130
    for _ in range(50):  # the step's group was killed with the harvest
        try:
            os.kill(step_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"step {step_pid} still runs after the harvest stopped")
    assert "stopped (signal 15)" in (tmp_path / "out" / "log.txt").read_text()


def test_table_names_the_gpu_and_uses_its_ceilings():
    """An H100 is judged against its own copy rate (3.0 TB/s), not the H200's, and the targets say where they
    were measured; a JSON without a GPU name falls back to the H200's, saying so."""
    bench = _bench("select+topk+gather B32-stage1 N392-k34-D384", "triton", 0.1, do_bench_median_us=10.0,
                   gbps=1500.0, do_bench_gbps=1500.0)
    h100 = table.rows({"machine_info": {"gpu": "NVIDIA H100 80GB HBM3"}, "benchmarks": [bench]})
    rendered = table.table(h100)
    assert rendered.startswith("GPU: H100: 798 TFLOP/s dense bf16, 3.0 TB/s copy") and "% of 3.0 TB/s" in rendered
    assert "| 1500 | 50.0 |" in rendered
    assert "set for an H200; measured on NVIDIA H100 80GB HBM3" in table.targets(h100).splitlines()[0]
    h200 = table.rows({"machine_info": {"gpu": "NVIDIA H200"}, "benchmarks": [bench]})
    assert "% of 4.3 TB/s" in table.table(h200) and "measured on" not in table.targets(h200)
    unknown = table.rows({"benchmarks": [bench]})
    assert "GPU not recorded: the H200's ceilings" in table.table(unknown)


def test_plan_fits_the_budget_by_dropping_extras_from_the_end():
    plan = harvest.default_plan("python3")
    kept, dropped = harvest.fit(plan)
    assert sum(s.limit_s for s in kept) <= harvest.BUDGET_S
    names = [s.name for s in kept]
    assert names[:3] == ["install", "machine", "warm"] and names.index("bench-policy") < names.index("tests")
    assert all(not s.extra for s in kept[: names.index("tests") + 1])
    extras = [s.name for s in plan if s.extra]
    assert dropped and [s.name for s in dropped] == extras[len(extras) - len(dropped):]  # the last extras
    assert [s.name for s in kept] == [s.name for s in plan if s not in dropped]
    small = [harvest.Step("a", 10, ["true"]), harvest.Step("x", 5, ["true"], extra=True),
             harvest.Step("y", 5, ["true"], extra=True)]
    assert [s.name for s in harvest.fit(small, 16)[0]] == ["a", "x"]
    with pytest.raises(ValueError, match="required steps"):
        harvest.fit(small, 9)


def test_the_compile_plan_is_a_second_call_within_the_budget():
    """The torch.compile benchmarks (compile seconds inside their limits) are the default plan's last extras,
    which its budget drops, and the whole of ``--plan compile``, which fits on its own."""
    dropped = [s.name for s in harvest.fit(harvest.default_plan("python3"))[1]]
    assert dropped[-2:] == ["bench-compile-inference", "bench-compile-phase2"]
    plan = harvest.compile_plan("python3")
    assert [s.name for s in plan] == ["install", "machine", "bench-compile-inference", "bench-compile-phase2"]
    assert harvest.fit(plan)[1] == [] and sum(s.limit_s for s in plan) <= harvest.BUDGET_S
    for step in plan[2:]:
        assert "benchmarks/bench_model.py" in step.argv and step.json_into == "model.json"


def test_every_warm_and_profile_job_names_a_real_builder():
    """A typo in a job would cost the GPU run its compile step: each names a builder whose signature takes its
    arguments, and each tile candidate job names a pass and four integers."""
    import importlib
    import inspect

    import gpu_profile
    import warm

    from stpcore.kernels._tiles import POLICY_TILE_CANDIDATES, valid_tiles

    jobs = warm.jobs()
    for name, module, builder, kwargs, how in jobs:
        inspect.signature(getattr(importlib.import_module(module), builder)).bind(**kwargs)
        if how not in ("call", "graph"):
            pass_, _, spec = how.partition(":")
            assert pass_ in POLICY_TILE_CANDIDATES and valid_tiles([int(x) for x in spec.split(",")]), name
    tiled = {how for *_, how in jobs if ":" in how}
    assert len(tiled) == sum(len(c) - 1 for c in POLICY_TILE_CANDIDATES.values())  # every candidate warmed
    for _title, module, builder, kwargs, _rows in gpu_profile.SECTIONS:
        inspect.signature(getattr(importlib.import_module(module), builder)).bind(**kwargs)


def test_warm_job_runs_a_builder_under_a_tile_override():
    """The job runner itself, on a small policy-attention step (the interpreter here, the compiled kernel where
    CUDA exists): a tile override job and a plain one both run and report no error."""
    import warm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = dict(provider="triton", B=1, H=1, N=20, D=16, dtype="fp32", device=device)
    for how in ("call", "bwd:32,32,4,2"):
        name, seconds, error = warm._run_job(("small", "benchmarks.bench_attention", "build_policy_step", small, how))
        assert error is None and seconds > 0, error


def test_warm_pool_stops_at_its_deadline_with_a_summary(capsys):
    """The warm-up prints the summary of what finished at its deadline and stops the workers still busy (they
    must not steal the CPU from the timed steps); a deadline that is not reached leaves every job finished."""
    import warm

    jobs = [("quick", "", "", {"seconds": 0.1}, "idle"), ("slow", "", "", {"seconds": 60}, "idle")]
    start = time.perf_counter()
    assert warm.run_pool(jobs, workers=2, deadline=8, run=warm._idle_job) == 1
    assert time.perf_counter() - start < 30
    out = capsys.readouterr().out
    assert "warm quick" in out and "warm slow" not in out
    assert "compile seconds: 1 of 2 warm-up jobs" in out and "1 not finished at the 8 s deadline" in out
    assert warm.run_pool(jobs[:1], workers=1, deadline=30, run=warm._idle_job) == 0
    assert "1 of 1 warm-up jobs" in capsys.readouterr().out


def _bench(group, provider, median_s, **extra):
    return {"group": group, "name": f"test[{provider}]", "params": {"provider": provider},
            "stats": {"median": median_s, "mean": median_s}, "extra_info": extra}


def test_table_checks_every_target(tmp_path):
    policy = "policy attention fwd+bwd paper B32-H6-N392-D64-bf16"
    varlen = "varlen attention fwd+bwd keep272 B32-H6-N392-D64-fp16"
    data = {"benchmarks": [
        _bench(policy, "reference", 0.1, do_bench_median_ms=12.0),
        _bench(policy, "triton", 0.1, do_bench_median_ms=1.0, cudagraph_median_ms=0.9),
        _bench(policy, "sdpa_flash", 0.1, do_bench_median_ms=0.7),
        _bench(policy, "sdpa_cudnn", 0.1, do_bench_median_ms=0.9),
        _bench(varlen, "triton", 0.1, do_bench_median_ms=0.5),
        _bench(varlen, "sdpa_efficient", 0.1, do_bench_median_ms=0.45),
        _bench("select+topk+gather B32-stage1 N392-k34-D384", "triton", 0.1, do_bench_median_us=45.0,
               cudagraph_median_us=12.5),
        _bench("select+topk+gather B32-stage2 N272-k24-D384", "triton", 0.1, do_bench_median_us=45.0,
               cudagraph_error="RuntimeError: capture failed"),
        _bench("stprivacy phase-2 step (STPrivacy + both recognizers) vit_small B=32", "reference", 0.9, peak_mib=900),
        _bench("stprivacy phase-2 step (STPrivacy + both recognizers) vit_small B=32", "auto", 0.25, peak_mib=400),
        _bench("stprivacy inference vit_small B=8 16x112x112", "masked", 0.040),
        _bench("stprivacy inference vit_small B=8 16x112x112", "reference", 0.012),
        _bench("stprivacy inference vit_small B=8 16x112x112", "auto", 0.010),
    ]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    rows = table.rows(data)
    assert rows[6]["ms"] == pytest.approx(0.045) and rows[6]["graph_ms"] == pytest.approx(0.0125)
    lines = table.targets(rows).splitlines()
    assert "12.00x (PASS" in lines[1]
    assert "1.43x the time of sdpa_flash" in lines[2] and "MISS" in lines[2]  # the fastest SDPA, named
    assert "1.11x the time of sdpa_efficient" in lines[3] and "PASS" in lines[3]
    assert "keep192" in lines[4] and "not measured" in lines[4]
    assert "12.5 us GPU time (PASS" in lines[6] and "eager 45.0 us" in lines[6]
    assert "no GPU time (RuntimeError: capture failed)" in lines[7]
    assert "not measured" in lines[8]
    assert "3.60x (PASS" in lines[9] and "0.44 of the reference (MISS" in lines[10]
    assert "1.20x (MISS" in lines[11] and "4.00x (PASS" in lines[12]
    rendered = table.table(rows)
    assert "| 0.70 (sdpa_flash) |" in rendered  # x best sdpa of the triton row
    assert table.main([str(path), str(tmp_path / "missing.json")]) == 0
    assert table.main([str(tmp_path / "missing.json")]) == 1
    assert "not measured" in table.targets([])


def test_warm_deadline_counts_from_its_process_start(monkeypatch):
    """torch's cold import (seconds on a fresh GPU machine) happens inside warm's deadline, not before it."""
    import warm

    passed = {}
    monkeypatch.setattr(warm, "_STARTED", time.perf_counter() - 7.0)  # as if importing torch took 7 s
    monkeypatch.setattr(warm, "run_pool", lambda todo, workers, deadline: passed.setdefault("deadline", deadline))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    warm.main(["--deadline", "20"])
    assert 12.0 < passed["deadline"] <= 13.0
    passed.clear()
    warm.main(["--deadline", "0"])  # no deadline stays none
    assert passed["deadline"] == 0.0


def test_targets_warn_when_auto_ran_no_triton_kernel():
    """A Triton that fails to import on the GPU machine makes dispatch fall back to PyTorch silently: the model
    benchmarks record what ran, and the targets say it above the verdicts instead of judging PyTorch code."""
    group = "phase-2 step vit_small B=32 bf16 (cuda)"
    fell_back = {"benchmarks": [
        _bench(group, "reference", 1.0, peak_mib=900.0, backends={"policy_attention": ["reference"]}),
        _bench(group, "auto", 0.5, peak_mib=300.0, backends={"policy_attention": ["chunked"],
                                                             "gumbel_select": ["reference"]}),
    ]}
    text = table.targets(table.rows(fell_back))
    assert f"WARNING: {group}: auto ran no Triton kernel" in text
    ran = {"benchmarks": [
        _bench(group, "reference", 1.0, peak_mib=900.0, backends={"policy_attention": ["reference"]}),
        _bench(group, "auto", 0.5, peak_mib=300.0, backends={"policy_attention": ["triton"],
                                                             "gumbel_select": ["triton"]}),
    ]}
    assert "WARNING" not in table.targets(table.rows(ran))
