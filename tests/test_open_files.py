"""A sync keeps a socket per connection: hundreds of connections must not die on the soft limit of open files."""
from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from click.testing import CliRunner

from runner.cli import main as cli

resource = pytest.importorskip("resource")


def test_a_run_raises_its_soft_limit_of_open_files_to_the_hard_one():
    """Linux's usual soft limit, 1,024, is a few hundred connections; the hard one is far higher."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 128:
        pytest.skip("the hard limit of open files is too low to lower the soft one under it")
    code = ("import resource\n"
            "from runner.cli.main import more_files\n"
            "before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
            "more_files()\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "print(before, soft == hard or soft >= 65536)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)))
    assert out.stdout.split() == ["64", "True"], out.stderr


def test_running_out_of_open_files_is_told_as_the_systems_limit_with_the_fix(monkeypatch, tmp_path):
    def out_of_files(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(cli, "_sync", out_of_files)
    config = tmp_path / "config.yaml"
    config.write_text("version: 1\n")
    result = CliRunner().invoke(cli.main, ["apply", str(config)])
    assert result.exit_code == cli.EXIT_FAILED
    assert "limit of open files" in result.output and "ulimit -n" in result.output
    assert "bug in the runner" not in result.output
