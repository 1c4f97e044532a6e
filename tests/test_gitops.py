"""The GitOps templates, tested as a team would use them: linted by the real linters, their shell steps run
against the sandbox (plan, then apply of the plan file), and the pre-commit hook run by the real `pre-commit`
on a throw-away git repository.

The tools come from the `test` extra (pyproject.toml): actionlint (with shellcheck for the `run:` scripts),
check-jsonschema (GitLab CI's schema), pre-commit."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import DEBITURA_KEY, ROOT, STRIPE_KEY

EXAMPLES = ROOT / "examples" / "gitops"
WORKFLOW = EXAMPLES / ".github" / "workflows" / "runner.yml"
GITLAB = EXAMPLES / ".gitlab-ci.yml"
TOOLS = Path(sys.executable).parent

SANDBOX = """version: 1
state: state/state.db
destination:
  type: debitura
  environment: sandbox
  api_key: "${DEBITURA_API_KEY}"
connections:
  - name: acme-stripe
    integration: stripe
    environment: sandbox
    credentials: {api_key: "${STRIPE_API_KEY}"}
    window: {last: 90d}
    server_filters: false
"""


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{TOOLS}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return found


def _path() -> str:
    return f"{TOOLS}{os.pathsep}{os.environ.get('PATH', '')}"  # actionlint finds shellcheck here


# --- linters ------------------------------------------------------------------------------------------------

def test_the_github_workflow_passes_actionlint_with_shellcheck():
    tool("shellcheck")
    r = subprocess.run([tool("actionlint"), str(WORKFLOW)], capture_output=True, text=True, env={**os.environ,
                                                                                                "PATH": _path()})
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The linter is real: the same workflow with an unquoted variable and an unknown expression fails."""
    broken = tmp_path / "runner.yml"
    broken.write_text(WORKFLOW.read_text().replace('runner apply plan.json --auto-approve',
                                                   'runner apply $PLAN --auto-approve ${{ secrets.X.y.z() }}'))
    r = subprocess.run([tool("actionlint"), str(broken)], capture_output=True, text=True,
                       env={**os.environ, "PATH": _path()})
    assert r.returncode == 1 and "runner.yml:" in r.stdout


def test_the_workflows_serialize_applies():
    wf = yaml.safe_load(WORKFLOW.read_text())
    assert wf["jobs"]["apply"]["concurrency"] == {"group": "runner-apply", "cancel-in-progress": False}
    gl = yaml.safe_load(GITLAB.read_text())
    assert gl["apply"]["resource_group"] == "runner-apply"
    cfg = yaml.safe_load((EXAMPLES / "config.yaml").read_text())
    assert cfg["state"] == {"type": "postgresql", "url": "${DATABASE_URL}"}


def test_the_gitlab_ci_file_passes_gitlab_ci_schema_and_a_broken_one_does_not(tmp_path):
    check = tool("check-jsonschema")
    ok = subprocess.run([check, "--builtin-schema", "vendor.gitlab-ci", str(GITLAB)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / ".gitlab-ci.yml"
    broken.write_text(GITLAB.read_text().replace("resource_group: runner-apply", "resource_group: [runner-apply]"))
    bad = subprocess.run([check, "--builtin-schema", "vendor.gitlab-ci", str(broken)], capture_output=True,
                         text=True)
    assert bad.returncode == 1, bad.stdout


# --- the templates' shell steps against the sandbox ----------------------------------------------------------

def _workspace(tmp_path: Path) -> tuple[Path, dict]:
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "config.yaml").write_text(SANDBOX)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "runner"  # what `pip install runner` puts on PATH, running this checkout's code
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m runner "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "STRIPE_API_KEY": STRIPE_KEY, "DEBITURA_API_KEY": DEBITURA_KEY, "NO_COLOR": "1"}
    return work, env


def _cases(work: Path) -> list[dict]:
    from runner import sandbox

    sandbox.reset_cache()  # the simulator's cases as the subprocesses left them (its SQLite file)
    return sandbox.get_simulator("debitura", work / "state" / "sandbox").cases()


def _bash(script: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    # GitHub's and GitLab's default: bash, stopping at the first failing command
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)


def _shell_steps(job: dict) -> list[dict]:
    """The job's own shell steps: not installing the runner (the shim stands for it), not talking to GitHub."""
    return [s for s in job["steps"] if "run" in s and not s.get("name", "").startswith("Install")
            and "gh " not in s["run"]]


def test_the_github_workflow_steps_plan_then_apply_the_plan_file(tmp_path):
    wf = yaml.safe_load(WORKFLOW.read_text())
    work, env = _workspace(tmp_path)
    outputs, summary = tmp_path / "github_output", tmp_path / "step_summary"
    env.update({k: str(v) for k, v in wf["env"].items()}, GITHUB_OUTPUT=str(outputs), GITHUB_STEP_SUMMARY=str(summary))
    env["RUNNER_CONFIG"] = "config.yaml"

    for step in _shell_steps(wf["jobs"]["validate"]) + _shell_steps(wf["jobs"]["plan"]):
        r = _bash(step["run"], work, env)
        assert r.returncode == 0, (step["name"], r.stdout, r.stderr)
    assert "exitcode=2" in outputs.read_text(), "cases would be created: --detailed-exitcode says 2"
    comment = (work / "comment.md").read_text()
    pending = json.loads((work / "plan.json").read_text())["pending"]
    assert pending > 0 and f"Plan: {pending} case(s) to create" in comment
    assert _cases(work) == [], "a pull request's plan creates nothing"

    (work / "plan.json").unlink()
    for step in _shell_steps(wf["jobs"]["apply"]):
        r = _bash(step["run"], work, env)
        assert r.returncode == 0, (step["name"], r.stdout, r.stderr)
    planned = {e["number"] for c in json.loads((work / "plan.json").read_text())["connections"] for e in c["invoices"]}
    assert {c["creditorReference"] for c in _cases(work)} == planned and len(planned) == pending

    for step in _shell_steps(wf["jobs"]["plan"]):  # the next pull request: nothing left to create
        assert _bash(step["run"], work, env).returncode == 0
    assert outputs.read_text().strip().splitlines()[-1] == "exitcode=0"


def test_the_gitlab_ci_scripts_plan_then_apply_the_plan_file(tmp_path):
    gl = yaml.safe_load(GITLAB.read_text())
    work, env = _workspace(tmp_path)
    env.update({k: str(v) for k, v in gl["variables"].items()})
    env.pop("RUNNER_COMMENT_TOKEN", None)
    for job in ("validate", "plan"):
        r = _bash("\n".join(gl[job]["script"]), work, env)
        assert r.returncode == 0, (job, r.stdout, r.stderr)
    pending = json.loads((work / "plan.json").read_text())["pending"]
    assert pending > 0 and _cases(work) == []
    r = _bash("\n".join(gl["apply"]["script"]), work, env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert len(_cases(work)) == pending


# --- the pre-commit hook ----------------------------------------------------------------------------------

def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _hook_repo(tmp_path: Path) -> tuple[Path, str]:
    """A git repository of this checkout's files (committed or not), as a user's `repo:` would be."""
    repo = tmp_path / "runner-hooks"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for f in filter(None, files):
        if f.startswith(("tests/", "bench/", "examples/")) or not (ROOT / f).exists() and not (ROOT / f).is_symlink():
            continue
        dest = repo / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / f).is_symlink():
            dest.symlink_to(os.readlink(ROOT / f))
        else:
            shutil.copy2(ROOT / f, dest)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "hooks")
    return repo, _git(repo, "rev-parse", "HEAD")


def test_the_pre_commit_hook_validates_without_secrets_and_names_the_broken_line(tmp_path):
    hooks, rev = _hook_repo(tmp_path)
    user = tmp_path / "infra"
    (user / ".github" / "workflows").mkdir(parents=True)
    shutil.copy(WORKFLOW, user / ".github" / "workflows" / "runner.yml")
    (user / "config.yaml").write_text(SANDBOX)
    (user / ".pre-commit-config.yaml").write_text(yaml.safe_dump({"repos": [
        {"repo": str(hooks), "rev": rev, "hooks": [{"id": "runner-validate"}]},
        {"repo": "local", "hooks": [{"id": "actionlint", "name": "actionlint", "entry": tool("actionlint"),
                                     "language": "system", "files": r"^\.github/workflows/"}]}]}))
    _git(user, "init", "-q")
    _git(user, "add", "-A")
    env = {k: v for k, v in os.environ.items() if k not in ("STRIPE_API_KEY", "DEBITURA_API_KEY", "PYTHONPATH")}
    env.update(PRE_COMMIT_HOME=str(tmp_path / "pre-commit-cache"), PATH=_path(), NO_COLOR="1")
    pre_commit = [tool("pre-commit"), "run", "--all-files", "--color", "never"]

    ok = subprocess.run(pre_commit, cwd=user, env=env, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "runner validate" in ok.stdout and "actionlint" in ok.stdout and "Failed" not in ok.stdout

    (user / "config.yaml").write_text(SANDBOX.replace("integration: stripe", "integration: strip"))
    _git(user, "add", "-A")
    bad = subprocess.run(pre_commit, cwd=user, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1
    assert "config.yaml:9:" in bad.stdout and "no integration named 'strip'" in bad.stdout, bad.stdout
