"""The README's request examples run against the real stack, so the docs cannot rot."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stack.demo import write_samples

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_curl_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]
    return commands


def test_readme_shows_the_two_quick_start_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's examples use curl")
def test_readme_curl_examples_classify_through_the_gateway(gateway, tmp_path):
    samples = write_samples(tmp_path / "demo-images")
    commands = readme_curl_commands()
    assert len(commands) >= 2
    for command in commands:
        command = command.replace(".cache/demo-images", str(samples[0].parent))
        command = command.replace("http://127.0.0.1:8080", gateway.url)
        result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["model"] == "digits" and answer["results"], command


def test_readme_documents_every_gateway_setting_and_builder_subcommand():
    import argparse

    from builder.cli import build_parser
    from server.settings import Settings

    text = README.read_text()
    settings = [f"GATEWAY_{name.upper()}" for name in Settings.model_fields]
    assert [name for name in settings if name not in text] == []
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    documented = set(re.findall(r"`([a-z]+)[ `]", text))
    assert [command for command in subparsers.choices if command not in documented] == []


def test_readme_links_to_docs_that_exist():
    targets = re.findall(r"\]\(((?:docs/)[^)#]*)\)", README.read_text())
    assert targets, "the README links to its design notes and figures"
    root = README.parent
    assert [target for target in targets if not (root / target).exists()] == []
