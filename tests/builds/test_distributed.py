"""`builder train` in two CPU processes (gloo), as torchrun starts it and as a multi-machine launch would
(each rank told its place by environment variables, here with a folder of its own to stand for its machine).

The runs are tiny (96 shapes at 8x8): what is checked is how the processes cooperate, not what they learn."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# 6 classes x 16 images: 96 training images, 6 steps of 16 (one process) or 2 x 8 (two), none short.
DATASET = "shapes:per_class=16,size=8"
COMMON = ["--dataset", DATASET, "--image-size", "8", "--seed", "3", "--warmup-epochs", "0"]
# Long enough for a run that never ends on its own, short enough not to hang the suite if one does.
WAIT_S = 300


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    # CPU processes and gloo, on a machine with GPUs too; one thread each, as torchrun sets.
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", BUILDER_DIST_TIMEOUT="120")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(processes: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", f"--nproc-per-node={processes}", "-m", "builder", "train", *args]
    done = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _start_ranks(args: list[str], folders: list[Path]) -> list[subprocess.Popen]:
    """One process per folder, rank = its index: the environment torchrun would give each, one machine each."""
    port = str(_free_port())
    ranks = []
    for rank, folder in enumerate(folders):
        folder.mkdir(exist_ok=True)
        env = _environment(
            RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(len(folders)), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        command = [sys.executable, "-m", "builder", "train", *args]
        ranks.append(subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return ranks


def _finish(ranks: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    results = []
    try:
        for process in ranks:
            out, err = process.communicate(timeout=WAIT_S)
            results.append((process.returncode, out.decode(), err.decode()))
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def _history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_two_processes_at_batch_b_follow_one_process_at_batch_2b(tmp_path):
    # Frozen backbone: BatchNorm uses its fixed statistics, so a process's half batch normalizes as the whole
    # batch would, and the two runs take the same steps up to float rounding. Each step averages gradients
    # across the processes and each epoch's figures are of all the images, or the curves part.
    frozen = [*COMMON, "--freeze-backbone", "--augment", "none", "--epochs", "3"]
    two = _torchrun(2, [*frozen, "--batch-size", "8", "--out", "two"], tmp_path)
    _torchrun(1, [*frozen, "--batch-size", "16", "--out", "one"], tmp_path)
    one_curve, two_curve = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [h["epoch"] for h in two_curve] == [1, 2, 3]
    for a, b in zip(one_curve, two_curve, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["epoch"], key, a[key], b[key])
    results = _json_lines(two.stdout)
    assert len(results) == 1 and results[0]["epochs"] == 3  # rank 0 alone prints the result
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "backend": "gloo"}


@pytest.mark.slow
def test_rank_0_alone_writes_and_resume_restores_every_rank(tmp_path):
    # Each rank in a folder of its own, as on two machines: only rank 0's folder gets the run, and --resume
    # works on rank 1 although last.pt exists on rank 0's side only. A step schedule does not depend on the
    # number of epochs: two epochs, then a third resumed, follow three epochs in one go.
    args = [*COMMON, "--augment", "light", "--schedule", "step", "--batch-size", "8", "--out", "run"]
    folders = [tmp_path / "rank0", tmp_path / "rank1"]
    first = _finish(_start_ranks([*args, "--epochs", "2"], folders))
    assert [rc for rc, _, _ in first] == [0, 0], [err[-2000:] for _, _, err in first]
    assert sorted(p.name for p in (folders[0] / "run").iterdir()) == sorted(
        ["best.pt", "last.pt", "metrics.json", "config.json", "datacheck.json", "curves.png"]
    )
    assert not any(folders[1].iterdir())  # rank 1 wrote nothing
    assert len(_json_lines(first[0][1])) == 1 and first[1][1] == ""
    interrupted = _history(folders[0] / "run")

    resumed = _finish(_start_ranks([*args, "--epochs", "3", "--resume"], folders))
    assert [rc for rc, _, _ in resumed] == [0, 0], [err[-2000:] for _, _, err in resumed]
    assert not any(folders[1].iterdir())

    straight_folders = [tmp_path / "straight0", tmp_path / "straight1"]
    straight = _finish(_start_ranks([*args, "--epochs", "3"], straight_folders))
    assert [rc for rc, _, _ in straight] == [0, 0], [err[-2000:] for _, _, err in straight]
    expected, got = _history(straight_folders[0] / "run"), _history(folders[0] / "run")
    assert got[:2] == interrupted
    # Every rank continues with its own random state (augmentation) and the sampler's epoch: the same curve.
    for a, b in zip(expected, got, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["epoch"], key)


def test_a_killed_rank_fails_the_run_with_a_clear_error(tmp_path):
    folders = [tmp_path / "rank0", tmp_path / "rank1"]
    ranks = _start_ranks([*COMMON, "--batch-size", "8", "--epochs", "100000", "--out", "run"], folders)
    try:
        metrics = folders[0] / "run" / "metrics.json"
        deadline = time.monotonic() + WAIT_S
        while not metrics.exists():  # the processes are past their first epoch together
            assert ranks[0].poll() is None and ranks[1].poll() is None, "a rank ended before the first epoch"
            assert time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGKILL)
        _, err = ranks[0].communicate(timeout=WAIT_S)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert ranks[0].returncode == 2
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("builder train: error: training stopped: another of the 2 processes"), last
