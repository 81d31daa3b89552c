"""The gateway image installs the base dependencies and copies server/ only: the gateway must not import
training, local-stack or client code, nor the libraries only they use."""

import json
import subprocess
import sys

import pytest

# nvidia: DALI (nvidia.dali), which decodes in Triton for `publish --preprocess gpu`, never in the gateway.
ABSENT_FROM_THE_IMAGE = ("torch", "rich", "sklearn", "skimage", "builder", "stack", "client", "nvidia")

# The packages are hidden as the image lacks them: a library that uses one only if it is there (httpx's
# command line uses rich) does without it, while a gateway module that needs one fails to import.
PROBE = f"""
import importlib.abc, json, sys

ABSENT = set({list(ABSENT_FROM_THE_IMAGE)!r})

class NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInTheImage())
import server.app
from server.settings import Settings
server.app.create_app(Settings(triton_grpc_url="127.0.0.1:9", triton_http_url="127.0.0.1:9", log_json=False))
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}} & ABSENT)))
"""


@pytest.mark.spawns
def test_the_gateway_imports_nothing_outside_its_image():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_no_gateway_module_names_a_package_outside_its_image_even_where_it_imports_late():
    import ast
    from pathlib import Path

    server = Path(__file__).resolve().parents[2] / "server"
    found = []
    for path in sorted(server.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            found += [
                f"{path.name}:{node.lineno} {name}" for name in names if name.split(".")[0] in ABSENT_FROM_THE_IMAGE
            ]
    assert found == []
