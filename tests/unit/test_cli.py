"""The CLI's contract: one line on stderr and exit code 2 for bad input, never a traceback."""

import subprocess
import sys

import pytest

from builder.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "/no/such/folder"], "neither a built-in"),
    (["export", "--checkpoint", "/no/such/best.pt"], "does not exist"),
    (["publish", "--onnx", "/no/such/model.onnx", "--name", "m"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line]) == 1
    assert message in err[-1] and "Traceback" not in "".join(err)


def test_unknown_architecture_lists_the_choices():
    result = run_cli("train", "--arch", "vgg99")
    assert result.returncode == 2
    assert "resnet18" in result.stderr and "Traceback" not in result.stderr


def test_empty_dataset_folder_is_a_one_line_error(tmp_path):
    result = run_cli("train", "--dataset", str(tmp_path), "--epochs", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("builder train: error: dataset folder")
    assert "Traceback" not in result.stderr


def test_non_numeric_epochs_is_rejected():
    result = run_cli("train", "--epochs", "many")
    assert result.returncode == 2 and "not a whole number" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["publish", "--onnx", "m.onnx", "--name", "m", "--instances", "0"], "argument --instances: 0 must be at least 1"),
    (["publish", "--onnx", "m.onnx", "--name", "m", "--intra-op-threads", "-2"],
     "argument --intra-op-threads: -2 must be 0 or more"),
])
def test_counts_are_checked_against_their_own_minimum(capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_a_count_that_may_be_0_passes_argparse(capsys, tmp_path):
    # Past argparse, the missing file is what stops it.
    assert main(["publish", "--onnx", "m.onnx", "--name", "m", "--max-queue-delay-us", "0",
                 "--repository", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_parsing_and_publishing_do_not_import_torch(tmp_path):
    # Importing torch takes seconds; only the stages that train or read checkpoints need it.
    code = ("import sys; from builder.cli import main; "
            "code = main(['publish', '--onnx', 'missing.onnx', '--name', 'm', '--repository', sys.argv[1]]); "
            "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr


def test_train_export_publish_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--image-size", "8", "--out", str(run)]) == 0
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--parity-images", "4"]) == 0
    assert main(["publish", "--onnx", str(run / "model.onnx"), "--name", "digits",
                 "--repository", str(tmp_path / "repo")]) == 0
    assert (tmp_path / "repo" / "digits" / "1" / "model.onnx").is_file()
    assert '"version": 1' in capsys.readouterr().out
