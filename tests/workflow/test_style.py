"""The workflow follows Snakemake conventions: lint-clean and snakefmt-formatted."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from .smk import REPO


def test_snakemake_lint_is_clean():
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "--configfile", "config/demo.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Lints for" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_snakefmt_check():
    snakefmt = shutil.which("snakefmt")
    if snakefmt is None:
        pytest.skip("snakefmt is not installed (pip install -e '.[dev]')")
    out = subprocess.run([snakefmt, "--check", "workflow"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_plain_snakemake_without_config_says_what_to_do(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    assert "--configfile config/<study>.yaml" in out.stdout + out.stderr
