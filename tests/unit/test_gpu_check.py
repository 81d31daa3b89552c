"""The GPU acceptance kit on a machine without a GPU: every check skips and says what is missing; the runner
turns a raising check into a failed row and exit 1; `make gpu-check` installs nothing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tomllib
import torch

from builder import gpu_check
from builder.gpu_check import FAIL, PASS, SKIPPED, CheckFailed, Kit, Skip, check

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


TRT_RUNTIME_PRESENT = importlib.util.find_spec("builder.trt_runtime") is not None


@pytest.fixture
def bare_machine(monkeypatch, tmp_path):
    """No GPU, no TensorRT, no tritonserver: whatever this machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ModuleNotFoundError
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.setattr(gpu_check, "NVIDIA_DRIVER_VERSION_FILE", tmp_path / "no-driver", raising=False)
    monkeypatch.setattr(gpu_check, "TRITON_BACKENDS", tmp_path / "no-backends", raising=False)


def test_without_a_gpu_every_check_skips_naming_what_is_missing(bare_machine) -> None:
    results = {r.name: r for r in gpu_check.run_checks()}

    assert len(results) == len(gpu_check.CHECKS) == 7
    assert {r.status for r in results.values()} == {SKIPPED}
    for result in results.values():
        # torch here is either a CPU-only build or a CUDA build that sees no GPU.
        assert "built without CUDA" in result.detail or "no NVIDIA GPU is visible" in result.detail
    for title in ("3 FP16 TensorRT engine", "4 INT8 TensorRT engine (ModelOpt)", "5 Engine caches follow the weights"):
        assert "TensorRT is not installed" in results[title].detail
        assert ("builder.trt_runtime missing" in results[title].detail) is not TRT_RUNTIME_PRESENT
    triton = results["6 Triton: plan and ORT+TensorRT models"]
    assert "tritonserver is not on PATH" in triton.detail
    assert any("tritonserver:24.10" in hint and "tensorrt==10.5" in hint for hint in triton.hints)
    dali = results["7 Triton: DALI preprocessing ensemble"]
    assert "DALI backend is not installed" in dali.detail and "tritonserver:24.10" in " ".join(dali.hints)
    # What to install for TensorRT is the engine stage's line: the release Triton loads.
    assert any("pip install 'tensorrt==10.5.*'" in hint for hint in results["3 FP16 TensorRT engine"].hints)


def test_without_builder_trt_runtime_the_engine_checks_say_so(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "builder.trt_runtime", None)  # importing it raises ModuleNotFoundError

    def imports_it(kit: Kit) -> str:
        from builder.trt_runtime import EngineRunner  # noqa: F401

        return "ran"

    assert gpu_check.need_trt_runtime() == ("builder.trt_runtime missing", None)
    (row,) = gpu_check.run_checks([imports_it])
    assert (row.status, row.detail) == (SKIPPED, "builder.trt_runtime missing")


def test_without_a_gpu_main_prints_the_table_and_exits_0(bare_machine, capsys) -> None:
    assert gpu_check.main([]) == 0

    out = capsys.readouterr().out
    assert "0 passed, 0 failed, 7 skipped" in out
    # Said once, not per check: the engine stage's line, naming the release Triton loads.
    assert out.count("TensorRT (checks 3-6): pip install 'tensorrt==10.5.*'") == 1
    assert out.count("an NVIDIA GPU with its driver loaded") == 1


def test_a_raising_check_is_a_failed_row_with_one_line_and_exit_1(capsys) -> None:
    @check("fine")
    def fine(kit: Kit) -> str:
        return "measured 1.0"

    @check("broken")
    def broken(kit: Kit) -> str:
        raise RuntimeError("CUDA error: an illegal memory access\nmore lines of the library's report")

    @check("wrong")
    def wrong(kit: Kit) -> str:
        raise CheckFailed("top-1 agrees on 80.0% of 360 images; needs >= 95%")

    assert gpu_check.main([], checks=[fine, broken, wrong]) == 1

    rows = {r.name: r for r in gpu_check.run_checks([fine, broken, wrong])}
    assert (rows["fine"].status, rows["fine"].detail) == (PASS, "measured 1.0")
    assert (rows["broken"].status, rows["broken"].detail) == (
        FAIL,
        "RuntimeError: CUDA error: an illegal memory access",
    )
    assert (rows["wrong"].status, rows["wrong"].detail) == (FAIL, "top-1 agrees on 80.0% of 360 images; needs >= 95%")
    out = capsys.readouterr().out
    assert "1 passed, 2 failed, 0 skipped" in out
    assert "Traceback" not in out and "more lines" not in out


def test_only_failures_make_the_exit_status_1() -> None:
    def skipped(kit: Kit) -> str:
        raise Skip("no NVIDIA GPU is visible")

    def passed(kit: Kit) -> str:
        return "ok"

    assert gpu_check.main([], checks=[skipped, passed]) == 0


def test_a_missing_package_skips_its_check_with_what_to_install() -> None:
    def needs_sklearn(kit: Kit) -> str:
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    def needs_a_builder_module(kit: Kit) -> str:
        raise ModuleNotFoundError("No module named 'builder.nowhere'", name="builder.nowhere")

    package, own = gpu_check.run_checks([needs_sklearn, needs_a_builder_module])

    assert (package.status, package.detail, package.hints) == (
        SKIPPED,
        "sklearn is not installed",
        ("pip install scikit-learn",),
    )
    assert own.status == FAIL  # a module of this project missing is a fault, not something to install


def test_a_shared_step_that_failed_fails_the_later_checks_that_need_it() -> None:
    calls = []

    def make():
        calls.append(1)
        raise ValueError("loss is nan")

    def first(kit: Kit) -> str:
        return kit.shared("trained model", make)

    second = first
    rows = gpu_check.run_checks([first, second])

    assert [r.status for r in rows] == [FAIL, FAIL]
    assert rows[0].detail == "ValueError: loss is nan"
    assert rows[1].detail == "needs the trained model, which failed: ValueError: loss is nan"
    assert len(calls) == 1


def test_the_kit_writes_only_in_a_temporary_folder_it_removes(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def writes(kit: Kit) -> str:
        (kit.dir / "model.plan").write_bytes(b"engine")
        seen.append(kit.dir)
        return "wrote"

    def raises(kit: Kit) -> str:
        (kit.dir / "half.onnx").write_bytes(b"")
        raise RuntimeError("stopped halfway")

    gpu_check.run_checks([writes, raises])

    assert seen and seen[0].parent == tmp_path
    assert list(tmp_path.iterdir()) == []


def test_the_table_is_plain_text_without_rich(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    results = [
        gpu_check.CheckResult("1 CUDA training", PASS, "loss 2.1 -> 0.4", 3.0),
        gpu_check.CheckResult("3 FP16 TensorRT engine", SKIPPED, "TensorRT is not installed", 0.0, ("pip install x",)),
    ]

    lines = gpu_check.render(results).splitlines()

    assert lines[0].split() == ["check", "result", "s", "detail"]
    assert lines[1].split() == ["1", "CUDA", "training", "pass", "3.0", "loss", "2.1", "->", "0.4"]
    assert "skipped" in lines[2] and lines[2].endswith("TensorRT is not installed")
    assert lines[3:] == ["What the skipped checks need:", "  pip install x", "1 passed, 0 failed, 1 skipped"]


def _dry_run(*arguments: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    done = subprocess.run(
        ["make", "-n", "gpu-check", *arguments], cwd=ROOT, capture_output=True, text=True, env=env, check=True
    )
    return done.stdout


@pytest.mark.spawns
def test_make_gpu_check_runs_the_kit_without_installing() -> None:
    with_venv = _dry_run("VENV=.venv")
    without_venv = _dry_run("VENV=/nonexistent/venv")

    assert with_venv.strip() == ".venv/bin/python -m builder.gpu_check"
    assert without_venv.strip() == "python3 -m builder.gpu_check"


def test_a_torch_for_a_newer_cuda_than_the_driver_says_so_and_what_to_install(monkeypatch) -> None:
    # torch has CUDA, torch.cuda.is_available() is False, and a driver is there: the facts go in the reason.
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu130")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "nvidia_driver", lambda: gpu_check.NvidiaDriver("535.104.05", "12.2"), raising=False)

    reason, hint = gpu_check.need_cuda()

    assert "CUDA 13.0" in reason and "2.9.1+cu130" in reason and "535.104.05" in reason and "12.2" in reason
    assert "install a torch built for CUDA 12.2 or older" in hint


def test_the_driver_is_read_from_nvidia_smi_or_the_kernel_module(monkeypatch, tmp_path) -> None:
    smi = "| NVIDIA-SMI 560.35.03     Driver Version: 560.35.03     CUDA Version: 12.6     |"
    module = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024"
    assert gpu_check.read_nvidia_driver(smi, module) == gpu_check.NvidiaDriver("560.35.03", "12.6")
    assert gpu_check.read_nvidia_driver("", module) == gpu_check.NvidiaDriver("550.54.15", None)

    # No nvidia-smi on PATH: the kernel module's file alone says a driver is there.
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    version_file = tmp_path / "version"
    version_file.write_text(module + "\n")
    monkeypatch.setattr(gpu_check, "NVIDIA_DRIVER_VERSION_FILE", version_file)
    reason, hint = gpu_check.cuda_unavailable("2.8.0+cu128", "12.8", gpu_check.nvidia_driver())
    assert "550.54.15" in reason and "CUDA 12.8" in reason and "install a torch built for" in hint

    version_file.unlink()
    assert gpu_check.nvidia_driver() is None
    assert gpu_check.cuda_unavailable("2.8.0", "12.8", None)[0].startswith("no NVIDIA GPU is visible")


def test_the_modelopt_hint_installs_the_pinned_release_without_extras(monkeypatch) -> None:
    # Its onnx extra brings numpy 2, onnxruntime-gpu and cupy, which the serving venv must not get.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modelopt" else object())
    reason, hint = gpu_check.need_modelopt()
    pin = next(line for line in PYPROJECT["project"]["optional-dependencies"]["builder"] if "modelopt" in line)
    assert f"pip install '{pin}'" in hint and "[onnx]'" not in hint

    def needs_modelopt(kit: Kit) -> str:
        raise ModuleNotFoundError("No module named 'modelopt'", name="modelopt")

    (result,) = gpu_check.run_checks([needs_modelopt])
    assert result.status == SKIPPED and result.hints[0].startswith(f"pip install '{pin}'")
