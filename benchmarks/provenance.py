"""Where a benchmark's numbers come from: code version, command, packages, machine and load.

Every result writer in `benchmarks/` calls `provenance()` when it starts (the load average is
the one the measurements began under) and stores the dict in its .json and
`provenance_markdown()` of it in its .md (`load_note()` adds a sentence on the load), and
writes both with `write_results()`:

    from provenance import provenance, provenance_markdown, write_results

Scripts here are run as `python benchmarks/x.py`, so this directory is on `sys.path`.
Standard library only: git through `subprocess`, versions through `importlib.metadata`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The distributions whose versions decide the numbers; openvino is optional and recorded only
# when installed, like any other that is missing.
PACKAGES = ("torch", "onnx", "onnxruntime", "onnxsim", "numpy", "openvino")
# Code that can change a result. benchmarks/results/ is excluded: a run overwrites tracked
# result files, and the next run must not call the code dirty because of that.
CODE_PATHS = ("abs_deploy", "benchmarks", ":(exclude)benchmarks/results")


def write_results(folder: Path, stem: str, result: dict, markdown: str) -> None:
    """`stem.json` and `stem.md` in `folder`, each written whole, and the markdown printed."""
    write_whole(folder / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_whole(folder / f"{stem}.md", markdown)
    print(markdown)


def write_whole(path: Path, text: str) -> None:
    """`text` into `path` through a temporary name of its own, then renamed: an interrupted run
    leaves the previous file, and two processes writing never share a temporary file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)            # mkstemp makes it private; results are for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def provenance(threads: int | None = None) -> dict:
    """The provenance record of the running script; call it before measuring.

    `threads` is the torch thread count the measurements use; by default torch's current one.
    """
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return {"commit": _git("rev-parse", "HEAD"),
            "dirty": _dirty(),
            "command": _command(),
            "packages": {"python": platform.python_version(), **_versions()},
            "cpu": _cpu(),
            "threads": threads,
            "load_avg": [round(v, 2) for v in os.getloadavg()],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def provenance_markdown(p: dict) -> str:
    """`p` as a short Markdown section for the end of a result file."""
    commit = f"`{p['commit']}`" if p["commit"] else "unknown (not a git checkout)"
    if p["dirty"]:
        commit += " **plus uncommitted changes under abs_deploy/ or benchmarks/**"
    packages = ", ".join(f"{k} {v}" for k, v in p["packages"].items())
    load = ", ".join(f"{v:.2f}" for v in p["load_avg"])
    return "\n".join([
        "## Provenance", "",
        f"- commit: {commit}",
        f"- command (from the repository root): `{p['command']}`",
        f"- date (UTC): {p['date']}",
        f"- packages: {packages}",
        f"- CPU: {p['cpu']['model']}, {p['cpu']['cores']} cores; torch threads: {p['threads']}",
        f"- load average at start (1, 5, 15 min): {load}", ""])


def load_note(p: dict, load_end: list[float], inflated: str) -> str:
    """One sentence on whether other work shared the cores during the run, from the 1-minute
    load average at its start (`p`) and end; `inflated` says what that load distorts."""
    start, cores = p["load_avg"][0], p["cpu"]["cores"]
    busy = start >= 0.5   # one other busy thread already shows as ~1 within a minute
    return (("Measured under load" if busy else "Measured on an otherwise idle machine")
            + f": 1-minute load average {start:.2f} at the start and {load_end[0]:.2f} at the "
            f"end, on {cores} cores." + (f" {inflated}" if busy else ""))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        return None   # no git, or not a checkout (an sdist): say unknown rather than fail
    return out.stdout.strip()


def _dirty() -> bool | None:
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    return None if status is None else bool(status)


def _command() -> str:
    """The command line as typed in the repository root, so a reader can paste it there."""
    words = [_relative(sys.executable), *(_relative(a) for a in sys.argv)]
    # PYTHONPATH decides which abs_deploy ran (a worktree against another checkout's venv).
    pythonpath = os.environ.get("PYTHONPATH")
    if pythonpath:
        words.insert(0, "PYTHONPATH=" + os.pathsep.join(
            _relative(p) for p in pythonpath.split(os.pathsep)))
    return shlex.join(words)


def _relative(arg: str) -> str:
    """`arg` relative to the root if it names an existing path inside it, else unchanged."""
    path = Path(arg)
    if not arg or not path.exists():
        return arg
    try:
        return str(path.resolve().relative_to(ROOT)) or "."
    except ValueError:
        return arg


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _cpu() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass   # not Linux: platform's answer stands
    # The cores this process may run on, which is what a container or taskset actually grants.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": cores}
