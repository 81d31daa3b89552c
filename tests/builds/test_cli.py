"""The CLI's contract: one line on stderr and exit code 2 for bad input, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from builder.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--dataset", "/no/such/folder"], "neither a built-in"),
        (["export", "--checkpoint", "/no/such/best.pt"], "does not exist"),
        (["publish", "--onnx", "/no/such/model.onnx", "--name", "m"], "does not exist"),
    ],
)
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


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["publish", "--onnx", "m.onnx", "--name", "m", "--instances", "0"],
            "argument --instances: 0 must be at least 1",
        ),
        (
            ["publish", "--onnx", "m.onnx", "--name", "m", "--intra-op-threads", "-2"],
            "argument --intra-op-threads: -2 must be 0 or more",
        ),
    ],
)
def test_counts_are_checked_against_their_own_minimum(capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_count_that_may_be_0_passes_argparse(capsys, tmp_path):
    # Past argparse, the missing file is what stops it.
    assert (
        main(["publish", "--onnx", "m.onnx", "--name", "m", "--max-queue-delay-us", "0", "--repository", str(tmp_path)])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_parsing_and_publishing_do_not_import_torch(tmp_path):
    # Importing torch takes seconds; only the stages that train or read checkpoints need it.
    code = (
        "import sys; from builder.cli import main; "
        "code = main(['publish', '--onnx', 'missing.onnx', '--name', 'm', '--repository', sys.argv[1]]); "
        "print(code, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr


@pytest.mark.slow
def test_train_export_publish_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--image-size", "8", "--out", str(run)]) == 0
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--parity-images", "4"]) == 0
    assert (
        main(["publish", "--onnx", str(run / "model.onnx"), "--name", "digits", "--repository", str(tmp_path / "repo")])
        == 0
    )
    assert (tmp_path / "repo" / "digits" / "1" / "model.onnx").is_file()
    assert '"version": 1' in capsys.readouterr().out


def _not_a_checkpoint(folder):
    """Two files `torch.load(weights_only=True)` refuses: text, and a pickled module (not a state dict)."""
    import torch

    text = folder / "README.md"
    text.write_text("# not a checkpoint\n")
    pickled = folder / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    return text, pickled


@pytest.mark.parametrize(
    "command",
    [
        ["export", "--checkpoint", "{path}"],
        ["prune", "--checkpoint", "{path}"],
        ["evaluate", "--checkpoint", "{path}", "--out", "{tmp}/eval"],
        ["quantize", "--method", "qat", "--checkpoint", "{path}"],
        ["build", "--checkpoint", "{path}", "--out", "{tmp}/build", "--no-publish"],
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_one_line_without_torch_advice(capsys, tmp_path, command):
    for path in _not_a_checkpoint(tmp_path):
        assert main([arg.format(path=path, tmp=tmp_path) for arg in command]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert "is not a checkpoint of this builder" in err[0] and "weights_only" not in err[0], err[0]


def test_init_and_resume_from_a_file_that_is_not_a_checkpoint_say_so_in_one_line(capsys, tmp_path):
    text, pickled = _not_a_checkpoint(tmp_path)
    assert (
        main(["train", "--epochs", "1", "--image-size", "8", "--init", str(pickled), "--out", str(tmp_path / "init")])
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "is not a checkpoint of this builder" in errors[0]
    assert "weights_only" not in errors[0]
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "last.pt").write_bytes(pickled.read_bytes())
    assert main(["train", "--epochs", "1", "--image-size", "8", "--resume", "--out", str(tmp_path / "resume")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "is not a checkpoint of this builder" in errors[0] and "weights_only" not in err


def test_not_a_checkpoint_from_a_fresh_process_is_one_line(tmp_path):
    text, _ = _not_a_checkpoint(tmp_path)
    result = run_cli("export", "--checkpoint", str(text))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"builder export: error: {text} is not a checkpoint of this builder (not a PyTorch file)"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: command"),
        (["export"], "the following arguments are required: --checkpoint"),
        (["train", "--epochs", "many"], "argument --epochs: 'many' is not a whole number"),
        (["train", "--arch", "vgg99"], "argument --arch: invalid choice: 'vgg99'"),
        (["export", "--checkpoint", "x.pt", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_a_command_line_mistake_is_one_line_with_a_help_hint(capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2
    assert len(err) == 1 and message in err[0] and "--help" in err[0], err


def test_a_command_line_mistake_from_a_fresh_process_prints_no_usage():
    result = run_cli("publish", "--onnx", "m.onnx")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "builder publish: error: the following arguments are required: --name (see `builder publish --help`)"
    ]


def _as_unprivileged_user(tmp_path):
    """A folder to work in and a command prefix that runs the CLI as a user whom file modes bind: root writes
    into read-only folders, so as root the CLI runs as `nobody` (setpriv), in a world-readable folder."""
    import os
    import shutil
    import tempfile

    if os.geteuid() != 0:
        return tmp_path, []
    assert shutil.which("setpriv"), "as root this test needs setpriv (util-linux) to run the CLI as nobody"
    base = Path(tempfile.mkdtemp(prefix="builder-ro-"))
    os.chmod(base, 0o755)
    return base, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_build_into_a_read_only_repository_fails_before_training(tmp_path):
    import os
    import shutil

    base, prefix = _as_unprivileged_user(tmp_path)
    try:
        read_only, out = base / "repo", base / "out"
        read_only.mkdir(mode=0o555)
        out.mkdir()
        os.chmod(out, 0o777)
        env = {**os.environ, "HOME": str(out), "MPLCONFIGDIR": str(out / ".mpl")}
        result = subprocess.run(
            [
                *prefix,
                sys.executable,
                "-m",
                "builder.cli",
                "build",
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--image-size",
                "8",
                "--no-prune",
                "--no-quantize",
                "--out",
                str(out / "build"),
                "--repository",
                str(read_only),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"builder build: error: model repository {read_only} is not writable (permission denied)"
        ]
        assert not (out / "build" / "train").exists()  # nothing trained
    finally:
        if base != tmp_path:
            shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("flag, what", [("--repository", "model repository"), ("--out", "build folder")])
def test_build_to_a_path_under_a_file_fails_before_training(capsys, tmp_path, flag, what):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    paths = {"--repository": str(tmp_path / "repo"), "--out": str(tmp_path / "build"), flag: str(blocker / "sub")}
    assert (
        main(
            [
                "build",
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--image-size",
                "8",
                "--no-prune",
                "--no-quantize",
                "--out",
                paths["--out"],
                "--repository",
                paths["--repository"],
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"builder build: error: {what} {blocker / 'sub'} is not writable ({blocker} is not a folder)"]
    assert not (tmp_path / "build" / "train").exists()


@pytest.mark.parametrize("command", ["export", "quantize", "evaluate"])
def test_an_output_that_cannot_be_written_is_one_line(capsys, tiny_run, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = {
        "export": ["export", "--checkpoint", str(tiny_run / "best.pt"), "--output", str(blocker / "m.onnx")],
        "quantize": [
            "quantize",
            "--onnx",
            str(tiny_run / "model.onnx"),
            "--output",
            str(blocker / "q.onnx"),
            "--calibration-images",
            "8",
        ],
        "evaluate": ["evaluate", "--onnx", str(tiny_run / "model.onnx"), "--out", str(blocker / "eval")],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"builder {command}: error:") and str(blocker) in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_a_missing_onnx_file_is_said_to_be_missing(capsys):
    assert main(["evaluate", "--onnx", "/no/such/model.onnx"]) == 2
    assert "does not exist" in capsys.readouterr().err.strip().splitlines()[-1]


def test_an_abbreviated_flag_is_a_mistake(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--epoch", "1"])
    assert exit_.value.code == 2
    assert "--epoch" in capsys.readouterr().err


def test_preprocessing_flags_override_the_models_own_spec_one_value_at_a_time(tiny_run, tmp_path):
    from builder import model_config
    from server.preprocess import PreprocessSpec

    repository = tmp_path / "repo"

    def published_spec(name: str, *flags: str) -> PreprocessSpec:
        assert (
            main(
                [
                    "publish",
                    "--onnx",
                    str(tiny_run / "model.onnx"),
                    "--name",
                    name,
                    "--repository",
                    str(repository),
                    *flags,
                ]
            )
            == 0
        )
        config = model_config.parse((repository / name / "config.pbtxt").read_text())
        return PreprocessSpec.from_parameters(config.parameters)

    own, resized = published_spec("own"), published_spec("resized", "--resize", "12")
    # Only the resize changed: the mean and std measured in training stay, not ImageNet's.
    assert resized.resize_size == 12
    assert (resized.mean, resized.std, resized.image_size, resized.color_mode) == (
        own.mean,
        own.std,
        own.image_size,
        own.color_mode,
    )
    # A crop alone brings the usual resize with it (crop / 0.875), not 256.
    assert published_spec("cropped", "--crop", "8").resize_size == 9
