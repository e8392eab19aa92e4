"""The GPU harvest: one unattended run on a lent GPU that turns its few minutes into every number, and loses
nothing to a crash or a timeout. ``benchmarks/gpu/run.sh`` calls this; see that file for the usage.

The plan is a list of steps, each a subprocess with its own time limit (killed with its process group when
it overruns), run in order of value: the kernel benchmarks (the engine's targets), the whole-model
benchmarks, the tests, then the extras (profile, tile sweep, ...), the extras dropped from the end until the
limits add up to at most ``BUDGET_S``. Every step writes its files as it ends: each benchmark group is its own
pytest process whose JSON is merged into ``kernels.json`` / ``model.json`` as soon as it exits, and
``table.md`` is rebuilt after each; the tests stream their result lines into ``tests.txt`` as they run. A
step cut by its limit loses only itself.

What comes back from the GPU machine is at most 8 files, so everything goes into these, directly in OUT:

    machine.txt   GPU, driver, torch/triton/CUDA/cuDNN versions, `stpcore info`, compile seconds
    kernels.json  pytest-benchmark JSON of the kernel groups (attention, tokens), merged
    model.json    pytest-benchmark JSON of the whole-model groups, merged
    table.md      the table and every target's PASS / MISS (benchmarks/gpu/table.py)
    tests.txt     the GPU test run, one line per test
    profile.txt   torch.profiler kernel tables (policy attention fwd+bwd, one phase-2 step)
    tiles.json    the tile sweep (benchmarks/gpu/tiles.py); merge into kernels/tiles.json to use it
    log.txt       the plan, every step's command, exit status, seconds and full output

``--dry-run`` (DRY_RUN=1 in run.sh) plans everything on any machine: pytest steps only collect, the other
steps print what they would do, and the last line is ``budget: N s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import table as table_mod  # noqa: E402

BUDGET_S = 300
# The modules that hold the GPU test step's tests: tests/kernels and tests/models whole, and every other module with a
# `gpu` test (tests/test_gpu_script.py checks that none is missing). Named, so the 12 workers collect these
# alone instead of the whole suite.
TEST_PATHS = ("tests/kernels", "tests/models", "tests/test_compiled_model.py", "tests/evaluation/test_protocol.py")
OUT_FILES = ("machine.txt", "kernels.json", "model.json", "table.md", "tests.txt", "profile.txt", "tiles.json",
             "log.txt")
TEST_WORKERS = 12  # xdist workers for the test step: Triton compiles in parallel on the GPU machine's 16 cores
KILL_GRACE_S = 5  # after SIGINT: time for pytest to write what it has
MIN_STEP_S = 3  # a step with less time left than this before the harvest's deadline is skipped
PIP_DONE = "install: pip finished"  # printed by the install step between pip and its import check


@dataclass
class Step:
    """One subprocess of the plan.

    Args:
        name: a short id ("bench-policy").
        limit_s: wall-clock limit; the step's process group is killed when it overruns.
        argv: the command.
        json_into: OUT file that the pytest-benchmark JSON of this step is merged into (a benchmark step).
        output_into: OUT file that receives the step's output as it runs (log.txt gets a copy of everything).
        extra: optional; extras are dropped from the end of the plan until the limits fit the budget.
        pytest: a pytest command (dry run: collected, not run).
        plan_argv: what a dry run runs instead for a non-pytest step (its own plan); None: nothing.
        env: extra environment variables.
    """

    name: str
    limit_s: int
    argv: list[str]
    json_into: str | None = None
    output_into: str | None = None
    extra: bool = False
    pytest: bool = False
    plan_argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)


def default_plan(py: str) -> list[Step]:
    """The steps of a real run, in order of value, extras last in the order they are dropped (last first)."""
    # One pytest process per benchmark group; no xdist (pytest-benchmark turns itself off under it); a per-test
    # limit inside the step's own, so one hung benchmark costs only itself.
    pytest_ = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",
               "--benchmark-only", "--timeout=20"]
    bench_attention = "benchmarks/bench_attention.py"
    return [
        # No network there: --no-index and no version check, so pip cannot wait on one; then prove the editable
        # install maps stpcore.kernels (every later step needs it). 20 s: the check is the machine's first, cold
        # import of torch with its CUDA libraries (8.8 s for the whole step on a warm CPU machine). A failure stops
        # the plan, and so does a timeout before pip finished (PIP_DONE); a timeout in the import check does not
        # (the machine step then says whether stpcore.kernels imports).
        Step("install", 20, ["bash", "-c", f"set -o pipefail; {shlex.quote(py)} -m pip install -q --no-deps --no-index "
                                           "--disable-pip-version-check --no-build-isolation -e . 2>&1 | tail -3 && "
                                           f"echo {PIP_DONE} && "
                                           f"{shlex.quote(py)} -c 'import stpcore.kernels.policy_attention as m; "
                                           "print(\"stpcore.kernels imports from\", m.__file__)'"]),
        Step("machine", 10, [py, "benchmarks/gpu/machine.py"], output_into="machine.txt",
             plan_argv=[py, "benchmarks/gpu/machine.py"]),
        # Its deadline counts from its own start (torch's import included), 5 s inside the limit for the summary;
        # one thread per worker, 16 workers on 16 cores.
        Step("warm", 25, [py, "benchmarks/gpu/warm.py", "--workers", "16", "--deadline", "20"],
             output_into="machine.txt", env={"OMP_NUM_THREADS": "1"},
             plan_argv=[py, "benchmarks/gpu/warm.py", "--plan"]),
        Step("bench-policy", 25, [*pytest_, bench_attention, "-k", "policy_attention_fwd_bwd and paper and not flex"],
             json_into="kernels.json", pytest=True),
        Step("bench-varlen", 30, [*pytest_, bench_attention, "-k", "varlen_attention_fwd_bwd and B32"],
             json_into="kernels.json", pytest=True),
        Step("bench-tokens", 20, [*pytest_, "benchmarks/bench_tokens.py"], json_into="kernels.json", pytest=True),
        # "not compiled": the torch.compile benchmarks (a minute of compiling each) are steps of their own.
        Step("bench-inference", 25, [*pytest_, "benchmarks/bench_model.py", "-k", "inference and not compiled"],
             json_into="model.json", pytest=True),
        Step("bench-phase2", 35, [*pytest_, "benchmarks/bench_model.py", "-k", "phase2 and not compiled"],
             json_into="model.json", pytest=True),
        Step("bench-fullframe", 15, [*pytest_, "benchmarks/bench_fullframe.py", "-k", "frames"],
             json_into="model.json", pytest=True),
        # The normal suite's kernel and model tests (no marker filter) and every gpu test elsewhere, in parallel
        # workers (each compiles its own Triton specialisations), one result line per test as it finishes.
        # The sm_90 compile test is left out: it compiles every kernel configuration with a stand-in driver, no
        # GPU involved, and CI runs it on every change.
        Step("tests", 65, [py, "-m", "pytest", *TEST_PATHS, "-m", "gpu or kernel_suite", "-p", "no:cacheprovider",
                           "--ignore=tests/kernels/test_compile.py",
                           "-o", "addopts=--strict-markers", "-v", "--timeout=120", "-rfEs",
                           "-n", str(TEST_WORKERS), "--dist", "loadgroup"], output_into="tests.txt", pytest=True,
             env={"OMP_NUM_THREADS": "1"}),
        Step("profile", 15, [py, "benchmarks/gpu/gpu_profile.py"], output_into="profile.txt", extra=True,
             plan_argv=[py, "benchmarks/gpu/gpu_profile.py", "--plan"]),
        Step("tiles", 15, [py, "benchmarks/gpu/tiles.py", "sweep", "{out}/tiles.json"], extra=True,
             plan_argv=[py, "benchmarks/gpu/tiles.py", "sweep", "--plan"]),
        Step("bench-phase1", 30, [*pytest_, "benchmarks/bench_model.py", "-k", "train_step"], json_into="model.json",
             extra=True, pytest=True),
        Step("bench-flex", 30, [*pytest_, bench_attention, "-k", "policy_attention_fwd_bwd and paper and flex"],
             json_into="kernels.json", extra=True, pytest=True),
        *compile_steps(py, pytest_),
    ]


def compile_steps(py: str, pytest_: list[str]) -> list[Step]:
    """torch.compile on the GPU, compile seconds included in each limit: the last extras of the default plan
    (which its 300 s leave out), and the whole of ``--plan compile`` (a second device call)."""
    timeout = [a if not a.startswith("--timeout=") else "--timeout=150" for a in pytest_]
    return [
        Step("bench-compile-inference", 120, [*timeout, "benchmarks/bench_model.py", "-k", "compiled_cudagraph"],
             json_into="model.json", extra=True, pytest=True),
        Step("bench-compile-phase2", 150, [*timeout, "benchmarks/bench_model.py", "-k", "compiled_phase2"],
             json_into="model.json", extra=True, pytest=True),
    ]


def compile_plan(py: str) -> list[Step]:
    """``--plan compile``: install and machine facts, then the compile steps (run after the default plan)."""
    steps = default_plan(py)
    pytest_ = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",
               "--benchmark-only", "--timeout=20"]
    return [steps[0], steps[1], *compile_steps(py, pytest_)]


def _child_setup() -> None:
    """In a step's process before it runs: SIGINT at its default action (a shell that started run.sh in the
    background would pass on an ignored SIGINT), and on Linux a SIGKILL when the harvest dies, however it dies."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def fit(steps: list[Step], budget_s: int = BUDGET_S) -> tuple[list[Step], list[Step]]:
    """(kept, dropped): extras dropped from the end until the limits add up to at most the budget."""
    kept = list(steps)
    dropped: list[Step] = []
    while sum(s.limit_s for s in kept) > budget_s:
        extras = [i for i, s in enumerate(kept) if s.extra]
        if not extras:
            raise ValueError(f"the required steps alone need {sum(s.limit_s for s in kept)} s > {budget_s} s")
        dropped.insert(0, kept.pop(extras[-1]))
    return kept, dropped


class Harvest:
    """Runs a plan into ``out``; every file it writes is one of OUT_FILES (at most 8, no folders)."""

    def __init__(self, out: Path, dry_run: bool = False) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dry_run = dry_run
        self.parts = Path(tempfile.mkdtemp(prefix="stpcore-harvest-"))  # step JSONs before merging; not in OUT
        self.results: list[dict] = []
        self.current: subprocess.Popen | None = None  # the step running now

    def stop_current(self) -> None:
        """Kill the running step's whole process group (the harvest itself is being stopped): a step left behind
        would run on, on the GPU, beside a rerun."""
        proc = self.current
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------------------------------ files
    def log(self, text: str, also: str | None = None) -> None:
        for name in ("log.txt", also):
            if name:
                with open(self.out / name, "a") as f:
                    f.write(text if text.endswith("\n") else text + "\n")
        print(text.rstrip("\n"), flush=True)

    def _write_atomic(self, name: str, text: str) -> None:
        tmp = self.out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.out / name)

    def merge_json(self, part: Path, into: str) -> int:
        """Append the benchmarks of one step's pytest-benchmark JSON to OUT/into; returns how many."""
        try:
            data = json.loads(part.read_text())
        except (OSError, ValueError):
            return 0
        target = self.out / into
        merged = json.loads(target.read_text()) if target.is_file() else {k: v for k, v in data.items()
                                                                           if k != "benchmarks"} | {"benchmarks": []}
        merged["benchmarks"] += data.get("benchmarks", [])
        self._write_atomic(into, json.dumps(merged, indent=1))
        return len(data.get("benchmarks", []))

    def rebuild_table(self) -> None:
        rows = []
        for name in ("kernels.json", "model.json"):
            path = self.out / name
            if path.is_file():
                try:
                    rows += table_mod.rows(json.loads(path.read_text()))
                except (OSError, ValueError) as exc:
                    self.log(f"(table: {name} unreadable: {exc})")
        if rows:
            self._write_atomic("table.md", table_mod.table(rows) + "\n\n" + table_mod.targets(rows) + "\n")

    # ------------------------------------------------------------------------------------------ steps
    def _argv(self, step: Step) -> list[str] | None:
        argv = [a.replace("{out}", str(self.out)) for a in step.argv]
        if self.dry_run:
            if step.pytest:  # collect only, in this process alone (no xdist workers)
                for flag in ("-n", "--dist"):
                    if flag in argv:
                        i = argv.index(flag)
                        argv = argv[:i] + argv[i + 2:]
                argv = [a for a in argv if a not in ("--benchmark-only", "-v")]
                return argv + (["--collect-only"] if "-q" in argv else ["-q", "--collect-only"])
            if step.plan_argv is None:
                return None
            return [a.replace("{out}", str(self.out)) for a in step.plan_argv]
        if step.pytest:  # one hung test must end inside the step's limit, so the step keeps what finished
            per_test = max(5, step.limit_s - 5)  # (a step cut shorter than that is left to its own limit)
            argv = [f"--timeout={min(int(a.split('=', 1)[1]), per_test)}" if a.startswith("--timeout=") else a
                    for a in argv]
        if "--deadline" in argv:  # a summary-printing deadline (warm) 5 s inside the step's limit, shortened or not
            i = argv.index("--deadline") + 1
            argv[i] = f"{min(float(argv[i]), max(1.0, step.limit_s - 5.0)):g}"
        if step.json_into:
            argv.append(f"--benchmark-json={self.parts / (step.name + '.json')}")
        return argv

    def run_step(self, step: Step) -> dict:
        argv = self._argv(step)
        self.log(f"\n== {step.name} (limit {step.limit_s} s){' [dry run]' if self.dry_run else ''}: "
                 + (shlex.join(argv) if argv else "(nothing to plan)"))
        if argv is None:
            return {"step": step.name, "status": "planned", "seconds": 0.0}
        # A calling pytest-xdist worker's variables would switch pytest-benchmark off in the steps; CI=true would
        # turn the suite's skips for what the GPU machine lacks (PyAV, DALI) into collection errors.
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT")) and k != "CI"}
        env = {**inherited, "PYTHONUNBUFFERED": "1", **step.env}
        start = time.perf_counter()
        try:
            # Its own process group (killed whole at the limit), with SIGINT at its default action (a shell that
            # started run.sh in the background would pass on an ignored SIGINT): pytest stops on SIGINT and
            # pytest-benchmark then still writes the JSON of every benchmark that finished.
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", start_new_session=True, preexec_fn=_child_setup)
        except OSError as exc:
            self.log(f"-- {step.name}: could not start ({exc})")
            return {"step": step.name, "status": f"not started ({exc})", "seconds": 0.0}
        self.current = proc
        sinks = [open(self.out / "log.txt", "a")]  # noqa: SIM115 - closed below
        if step.output_into and not self.dry_run:
            sinks.append(open(self.out / step.output_into, "a"))  # noqa: SIM115
        tail: list[str] = []

        def pump() -> None:
            for line in proc.stdout:
                for f in sinks:
                    f.write(line)
                    f.flush()
                tail.append(line)
                del tail[:-40]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        status = "ok"
        try:
            rc = proc.wait(timeout=step.limit_s)
            if rc != 0:
                status = f"exit {rc}"
        except subprocess.TimeoutExpired:
            status = f"TIMEOUT after {step.limit_s} s (interrupted; later steps go on)"
            self._kill(proc)
        self.current = None
        reader.join(timeout=5)
        for f in sinks:
            f.close()
        seconds = round(time.perf_counter() - start, 1)
        result = {"step": step.name, "status": status, "seconds": seconds, "pip_done": any(PIP_DONE in line
                                                                                         for line in tail)}
        if step.json_into and not self.dry_run:
            part = self.parts / (step.name + ".json")
            result["benchmarks"] = self.merge_json(part, step.json_into) if part.is_file() else 0
            self.rebuild_table()
        self.log(f"-- {step.name}: {status}, {seconds} s" + (f", {result['benchmarks']} benchmarks merged into "
                                                              f"{step.json_into}" if "benchmarks" in result else ""))
        if status != "ok":
            self.log("".join(tail[-15:]))
        return result

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """SIGINT first (pytest ends its session and writes the benchmark JSON of what finished), then SIGTERM,
        then SIGKILL, each to the step's whole process group."""
        for sig, wait in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGTERM, 3), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def run(self, steps: list[Step], budget_s: int = BUDGET_S) -> list[dict]:
        kept, dropped = fit(steps, budget_s)
        plan = [f"{s.name:16} {s.limit_s:4d} s{'  (extra)' if s.extra else ''}" for s in kept]
        self.log("GPU harvest plan (in order; each step's limit):\n  " + "\n  ".join(plan))
        for s in dropped:
            self.log(f"  dropped to fit {budget_s} s: {s.name} ({s.limit_s} s)")
        total = sum(s.limit_s for s in kept)
        started = time.perf_counter()
        deadline = started + total  # a step that overran (kill grace) takes its seconds from the steps after it
        try:
            for step in kept:
                left = int(deadline - time.perf_counter())
                if left < step.limit_s and not self.dry_run:
                    if left < MIN_STEP_S:
                        self.log(f"\n== {step.name}: skipped, {max(left, 0)} s left before the harvest's deadline")
                        self.results.append({"step": step.name, "status": "skipped (no time left)", "seconds": 0.0})
                        continue
                    self.log(f"\n({step.name}: limit {step.limit_s} -> {left} s, the time left before the deadline)")
                    step = dataclasses.replace(step, limit_s=left)
                try:
                    self.results.append(self.run_step(step))
                except Exception as exc:  # noqa: BLE001 - the harvest itself must not stop on one step
                    self.log(f"-- {step.name}: harvest error {type(exc).__name__}: {exc}")
                    self.results.append({"step": step.name, "status": f"harvest error ({exc})", "seconds": 0.0})
                status = self.results[-1]["status"]
                if step.name == "install" and status != "ok" and not self.dry_run:
                    if status.startswith("TIMEOUT") and self.results[-1].get("pip_done"):
                        # pip finished; the cold import check was slow: machine.txt says whether it imports
                        self.log("-- install: timed out; going on (machine.txt's `stpcore info` says whether "
                                 "stpcore.kernels imports; the benchmarks record the backends that ran)")
                        continue
                    # Without stpcore.kernels every "auto" figure would measure the reference code, unmarked.
                    self.log("-- install failed: the plan stops here (every later figure would measure PyTorch "
                             "code instead of stpcore's kernels); see the lines above")
                    break
        finally:
            shutil.rmtree(self.parts, ignore_errors=True)
            for tmp in self.out.glob(".*.tmp"):  # a write cut short by a kill: never a 9th file
                tmp.unlink(missing_ok=True)
        summary = ", ".join(f"{r['step']} {r['status']} {r['seconds']} s" for r in self.results)
        self.log(f"\nsteps: {summary}")
        self.log(f"wall: {time.perf_counter() - started:.0f} s")
        self.log(f"budget: {total} s")
        return self.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="results folder ($OUT on the GPU machine)")
    parser.add_argument("--dry-run", action="store_true", help="plan and collect only (any machine)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the steps")
    parser.add_argument("--plan", choices=("default", "compile"), default="default",
                        help="default: every number in order of value; compile: the torch.compile steps alone")
    args = parser.parse_args(argv)
    harvest = Harvest(Path(args.out), dry_run=args.dry_run)

    def stop(signum, frame):  # the device call's timeout, or Ctrl-C: the running step goes down with the harvest
        harvest.stop_current()
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        harvest.run((compile_plan if args.plan == "compile" else default_plan)(args.python))
    except KeyboardInterrupt as exc:
        harvest.log(f"stopped ({exc}); the files written so far stay")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
