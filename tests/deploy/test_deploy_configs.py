"""Offline checks of the deployment files: compose, Dockerfiles, Prometheus, Grafana, Kubernetes.

No container is started. Where the real validators are installed (`docker-compose` or `docker compose`,
`promtool`) they are run too; otherwise those tests skip and say why.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version
from prometheus_client.metrics import MetricWrapperBase

from server.drain import longest_request_s
from server.metrics import STAGES, GatewayMetrics
from server.replicas import parse_endpoints
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKER = ROOT / "docker"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
GRAFANA = ROOT / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/gateway.json"
K8S = ROOT / "deploy/k8s"

# Triton's metrics (its documented names) with their labels; the dashboard may use only these.
TRITON_METRICS = {
    name: {"model", "version"}
    for name in (
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_inference_pending_request_count",
    )
} | {
    name: {"gpu_uuid"}
    for name in (
        "nv_gpu_utilization",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_memory_total_bytes",
        "nv_gpu_power_usage",
        "nv_energy_consumption",
    )
}
SCRAPE_LABELS = {"instance", "job"}
PROMQL_WORDS = {
    "sum",
    "by",
    "without",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "avg",
    "max",
    "min",
    "count",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "or",
    "and",
    "unless",
    "offset",
}
RUN_TIMEOUT_S = 30


# ---------------------------------------------------------------------------------------------- helpers


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objects, f"{key} defined twice"
                objects[key] = doc
    return objects


def volumes(service: dict) -> list[dict]:
    """Short (`src:dst[:ro]`) and long volume syntax, as {source, target, read_only}."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            found.append({"source": source, "target": target, "read_only": "ro" in mode})
        else:
            found.append(
                {"source": volume["source"], "target": volume["target"], "read_only": bool(volume.get("read_only"))}
            )
    return found


def ports(service: dict) -> list[tuple[str, int, int]]:
    """`[ip:]host:container` as (ip or "", host, container)."""
    parsed = []
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        ip = parts[0] if len(parts) == 3 else ""
        parsed.append((ip, int(parts[-2]), int(parts[-1])))
    return parsed


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items() if v is not None}  # None: passed through from the shell


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def reservation_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def gateway_metric_labels() -> dict[str, set[str]]:
    """Every sample name the gateway exposes, with its labels, from its own registry."""
    metrics = GatewayMetrics()
    for wrapper in vars(metrics).values():
        if isinstance(wrapper, MetricWrapperBase) and wrapper._labelnames:
            wrapper.labels(*["x"] * len(wrapper._labelnames))  # a child, so the family has samples
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_grouping = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", without_labels)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_grouping)
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", without_ranges))
    return {w for w in words if w not in PROMQL_WORDS}


def used_labels(expr: str) -> set[str]:
    labels = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels.update(label.strip() for label in group.split(",") if label.strip())
    for matchers in re.findall(r"\{([^}]*)\}", re.sub(r'"[^"]*"', '""', expr)):
        labels.update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*[!=]", matchers))
    return labels


def duration_s(text: str) -> float:
    """A compose duration (`90s`, `1m30s`, `500ms`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def gateway_settings(env: dict[str, str], monkeypatch) -> Settings:
    """The gateway's settings with these GATEWAY_* variables set, as the process would read them."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=RUN_TIMEOUT_S)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    return k8s_objects()


# ---------------------------------------------------------------------------------------------- compose


def test_compose_has_the_services_and_profiles(services):
    assert set(services) == {"triton", "builder", "gateway", "prometheus", "grafana", "locust-master", "locust-worker"}
    profiles = {name: service.get("profiles", []) for name, service in services.items()}
    assert profiles["builder"] == ["build"]
    assert profiles["locust-master"] == profiles["locust-worker"] == ["loadtest"]
    # The serving stack comes up with a plain `up`.
    assert not any(profiles[name] for name in ("triton", "gateway", "prometheus", "grafana"))


@pytest.mark.parametrize("name", ["triton", "builder"])
def test_gpu_is_reserved(services, name):
    assert reservation_devices(services[name]) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_gateway_and_monitoring_reserve_no_gpu(services):
    for name in ("gateway", "prometheus", "grafana", "locust-master", "locust-worker"):
        assert not reservation_devices(services[name]), name


def test_triton_serves_the_model_repository_read_only(services):
    triton = services["triton"]
    mounts = [v for v in volumes(triton) if v["target"] == "/models"]
    assert mounts == [{"source": "./model_repository", "target": "/models", "read_only": True}]
    command = triton["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert command[0] == "tritonserver"
    for flag in (
        "--model-repository=/models",
        "--model-control-mode=poll",
        "--repository-poll-secs=5",
        "--exit-on-error=false",
        "--strict-readiness=false",
    ):
        assert flag in command
    assert triton["shm_size"] == "1g"  # the Python backend's tensors go through /dev/shm


def test_triton_is_built_with_onnxruntime(services):
    build = services["triton"]["build"]
    dockerfile = ROOT / build["context"] / build["dockerfile"]
    assert dockerfile == DOCKER / "triton.Dockerfile"
    instructions = dockerfile_instructions(dockerfile)
    assert instructions[0] == ("FROM", "nvcr.io/nvidia/tritonserver:24.10-py3")
    installs = " ".join(args for word, args in instructions if word == "RUN" and "pip install" in args)
    assert "onnxruntime" in installs and '"numpy<2"' in installs
    # A `docker run` without the compose volume still loads --target gpu models: the cache root exists.
    from builder.model_config import DEFAULT_TRT_CACHE_ROOT

    made = [args for word, args in instructions if word == "RUN" and args.startswith("mkdir -p ")]
    assert any(DEFAULT_TRT_CACHE_ROOT in args.split() for args in made)


def test_only_the_gateway_is_published_beyond_localhost(services):
    for name, service in services.items():
        for ip, host, container_port in ports(service):
            if name == "gateway":
                assert (host, container_port) == (8080, 8080)
            else:
                assert ip == "127.0.0.1", f"{name} publishes {host} on every interface"
    assert {p[2] for p in ports(services["triton"])} == {8000, 8001, 8002}
    assert ports(services["gateway"]) == [("", 8080, 8080)]


def test_triton_healthcheck_asks_for_readiness(services):
    check = services["triton"]["healthcheck"]["test"]
    assert check[0] == "CMD" and check[1:3] == ["curl", "-fsS"]
    assert check[3].endswith("localhost:8000/v2/health/ready")
    # The stock image may lack curl; the Dockerfile makes sure it is there.
    assert "curl" in (DOCKER / "triton.Dockerfile").read_text()


def test_gateway_healthcheck_runs_python_against_readyz(services):
    check = services["gateway"]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"]  # python:3.11-slim has no curl
    compile(check[3], "healthcheck", "exec")
    assert "http://127.0.0.1:8080/readyz" in check[3]


def test_compose_lets_the_gateway_drain_before_it_is_killed(services, monkeypatch):
    gateway = services["gateway"]
    settings = gateway_settings(environment(gateway), monkeypatch)
    # Without it, compose kills the container 10 s after SIGTERM, whatever is still in flight.
    assert "stop_grace_period" in gateway, "compose's default of 10 s cuts the drain short"
    assert duration_s(gateway["stop_grace_period"]) > settings.drain_s + longest_request_s(settings)
    assert gateway.get("stop_signal", "SIGTERM") == "SIGTERM"  # the signal that starts the drain


def test_gateway_waits_for_a_healthy_triton(services):
    assert services["gateway"]["depends_on"] == {"triton": {"condition": "service_healthy"}}


def test_gateway_environment_names_real_settings(services, monkeypatch):
    env = environment(services["gateway"])
    assert env["GATEWAY_TRITON_GRPC_URL"] == "triton:8001"
    assert env["GATEWAY_TRITON_HTTP_URL"] == "triton:8000"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    for key, value in env.items():
        field = key.removeprefix("GATEWAY_").lower()
        assert key.startswith("GATEWAY_") and field in Settings.model_fields, f"{key} is no gateway setting"
        assert str(getattr(settings, field)) == value


def test_the_published_gateway_takes_its_api_keys_from_the_shell(services):
    # The image listens on every interface (its CMD); the keys are passed through, not written here.
    assert services["gateway"]["environment"]["GATEWAY_API_KEYS"] is None


def test_build_contexts_and_dockerfiles_exist(services):
    for name, service in services.items():
        if "build" in service:
            context = ROOT / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name
            assert service.get("image"), f"{name}: name the image so Kubernetes can refer to it"


def test_builder_runs_the_cli_in_the_mounted_repository(services):
    builder = services["builder"]
    assert builder["entrypoint"] == ["builder"]
    assert {"source": ".", "target": builder["working_dir"], "read_only": False} in volumes(builder)
    instructions = dockerfile_instructions(ROOT / builder["build"]["context"] / builder["build"]["dockerfile"])
    assert instructions[0] == ("FROM", "nvcr.io/nvidia/tensorrt:24.10-py3")
    assert any(word == "RUN" and 'pip install --no-cache-dir ".[builder]"' in args for word, args in instructions)
    assert ("ENTRYPOINT", '["builder"]') in instructions


def test_engines_and_triton_come_from_one_ngc_release():
    # A TensorRT plan loads only in the TensorRT release that built it.
    tags = {}
    for name in ("triton.Dockerfile", "builder.Dockerfile"):
        base = dockerfile_instructions(DOCKER / name)[0][1]
        tags[name] = re.fullmatch(r"nvcr\.io/nvidia/\w+:(\d\d\.\d\d)-py3", base).group(1)
    assert len(set(tags.values())) == 1, tags


def test_locust_runs_the_loadtests_locustfile_against_the_gateway(services):
    master, worker = services["locust-master"], services["locust-worker"]
    for service in (master, worker):
        assert service["image"].startswith("locustio/locust")
        assert any(v["source"] == "./loadtests" and v["target"] == "/mnt/locust" for v in volumes(service))
        command = service["command"]
        assert command[command.index("-f") + 1] == "/mnt/locust/locustfile.py"
    assert "--master" in master["command"]
    assert master["command"][master["command"].index("--host") + 1] == "http://gateway:8080"
    assert worker["command"][worker["command"].index("--master-host") + 1] == "locust-master"
    assert (ROOT / "loadtests/locustfile.py").is_file()


def test_containerized_locust_runs_only_the_gateway_scenario_on_mounted_images(services):
    from loadtests.samples import DEFAULT_FOLDER

    for service in (services["locust-master"], services["locust-worker"]):
        # The locust image has no tritonclient, so the Triton scenario must not be picked.
        assert service["command"][-1] == "GatewayUser"
        env = environment(service)
        # The gateway container is not on loopback: the locustfile refuses it unless told it is ours.
        assert env["LOADTEST_ALLOW_REMOTE"] == "1"
        images = [v for v in volumes(service) if v["target"] == env["LOADTEST_IMAGES"]]
        assert images == [{"source": f"./{DEFAULT_FOLDER}", "target": "/mnt/images", "read_only": True}]


def test_locustfile_loads_from_its_own_folder_alone(tmp_path):
    # What the locust container does: the folder mounted somewhere, no project on the path.
    folder = tmp_path / "locust"
    folder.mkdir()
    for source in (ROOT / "loadtests").glob("*.py"):
        (folder / source.name).write_bytes(source.read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    locust = Path(sys.executable).with_name("locust")
    listed = subprocess.run(
        [str(locust), "-f", str(folder / "locustfile.py"), "--list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "GatewayUser" in listed.stdout


def test_triton_keeps_onnxruntime_tensorrt_engines_where_publish_points_them(compose, services):
    from builder.model_config import DEFAULT_TRT_CACHE_ROOT

    cache = [v for v in volumes(services["triton"]) if v["target"] == DEFAULT_TRT_CACHE_ROOT]
    assert len(cache) == 1 and not cache[0]["read_only"]
    assert cache[0]["source"] in compose["volumes"]  # a named volume: it outlives the container


# A TensorRT engine is built when Triton loads a model published with `--target gpu` (minutes on a cold cache);
# health checks must not give up on Triton before that.
ENGINE_BUILD_BUDGET_S = 600


def compose_seconds(duration: str) -> float:
    """Compose's duration strings (`90s`, `20m`, `1m30s`, `1h`) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", str(duration))
    assert parts and any(parts.groups()), f"unreadable duration {duration!r}"
    hours, minutes, seconds = (int(g or 0) for g in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def test_triton_has_time_to_build_tensorrt_engines_before_its_health_counts(services):
    check = services["triton"]["healthcheck"]
    assert compose_seconds(check["start_period"]) >= ENGINE_BUILD_BUDGET_S


def builder_image_pins() -> tuple[dict[str, str], str]:
    """The builder image's constraints (name -> version) and its pip install instruction."""
    instructions = dockerfile_instructions(DOCKER / "builder.Dockerfile")
    install = next(args for word, args in instructions if word == "RUN" and '".[builder]"' in args)
    constraints_file = re.search(r"--constraint (\S+)", install).group(1)
    assert ("COPY", f"{constraints_file} {constraints_file}") in instructions
    pins = dict(
        line.split("==")
        for line in (ROOT / constraints_file).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return pins, install


def test_builder_image_holds_torch_to_a_cuda_12_build():
    # PyTorch's cu126 index builds torch against CUDA 12.6 (nvidia-cuda-runtime-cu12 12.6.77), the CUDA of the
    # 24.10 containers; the newest torch brings CUDA 13 libraries, which the drivers 24.10 runs on may not load.
    pins, install = builder_image_pins()
    assert {"torch", "torchvision"} <= set(pins)
    assert pins["torch"].endswith("+cu126") and pins["torchvision"].endswith("+cu126")
    assert "--extra-index-url https://download.pytorch.org/whl/cu126" in install
    assert "tensorrt" not in pins  # the base image's TensorRT 10.5 stays
    # The image refuses to build with anything else.
    assert "tensorrt.__version__.startswith('10.5.')" in install and "torch.version.cuda == '12.6'" in install


def builder_requirements_on(package: str) -> dict[str, SpecifierSet]:
    """Every requirement on `package` in the dependency tree of `.[builder]`: pyproject's own, then each
    installed dependency's declared one (its metadata, markers evaluated with the extras asked for)."""
    found: dict[str, SpecifierSet] = {}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    queue = [
        (project["name"], Requirement(r)) for r in project["dependencies"] + project["optional-dependencies"]["builder"]
    ]
    seen: set[tuple[str, frozenset[str]]] = set()
    while queue:
        parent, requirement = queue.pop()
        name = canonicalize_name(requirement.name)
        if name == package:
            found[parent] = found.get(parent, SpecifierSet()) & requirement.specifier
        # torchvision's metadata is that of the installed release, not the pinned one (checked on its own).
        if name in (package, "torchvision") or (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        try:
            declared = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in declared:
            child = Requirement(line)
            environments = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if child.marker is None or any(child.marker.evaluate(env) for env in environments):
                queue.append((name, child))
    return found


def test_builder_image_torch_satisfies_every_dependency():
    # nvidia-modelopt 0.47.0 declares torch>=2.8: a pin below it made the image's pip install fail.
    pins, _ = builder_image_pins()
    torch_version = Version(pins["torch"])
    requirements = builder_requirements_on("torch")
    assert "nvidia-modelopt" in requirements  # the walk reached the dependency that broke the image
    unmet = {parent: str(spec) for parent, spec in requirements.items() if torch_version not in spec}
    assert not unmet, f"torch {torch_version} in docker/builder-constraints.txt does not satisfy {unmet}"
    # Each torchvision release requires exactly one torch: 0.N pairs with 2.(N - 15) since torch 2.0.
    vision = Version(pins["torchvision"])
    assert (vision.major, vision.minor - 15) == (torch_version.major - 2, torch_version.minor)
    assert vision.local == torch_version.local


def test_builder_image_holds_onnx_to_the_release_the_tests_run():
    # ModelOpt's and ONNX Runtime's quantizers are tested with constraints.txt's onnx; left free, the
    # image's pip would take whatever is newest when it is built.
    pins, _ = builder_image_pins()
    tested = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["onnx"] == tested["onnx"]
    assert "onnxruntime" in pins  # the newest for the image's Python 3.10, not constraints.txt's (3.11 and up)


def test_monitoring_mounts_existing_files(services):
    prometheus = volumes(services["prometheus"])
    assert {
        "source": "./deploy/prometheus/prometheus.yml",
        "target": "/etc/prometheus/prometheus.yml",
        "read_only": True,
    } in prometheus
    grafana = {v["target"]: v for v in volumes(services["grafana"])}
    assert grafana["/etc/grafana/provisioning"]["source"] == "./deploy/grafana/provisioning"
    for service in ("prometheus", "grafana"):
        for volume in volumes(services[service]):
            assert (ROOT / volume["source"]).exists(), volume["source"]


def test_compose_file_validates():
    command = compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed (`make system-tools`)")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "--profile", "build", "--profile", "loadtest", "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr


def test_dockerignore_keeps_build_contexts_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", ".cache", "model_repository/*"):
        assert entry in ignored


# ---------------------------------------------------------------------------------------------- gateway image


def test_gateway_image_installs_the_base_dependencies_only(services):
    build = services["gateway"]["build"]
    dockerfile = ROOT / build["context"] / build["dockerfile"]
    instructions = dockerfile_instructions(dockerfile)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    installs = [args for word, args in instructions if word == "RUN" and "pip install" in args]
    assert len(installs) == 1
    target = installs[0].split("pip install", 1)[1].split("&&")[0].split()
    assert target == ["--no-cache-dir", "."], "no extras: they bring torch into the gateway image"
    assert not any("torch" in args.lower() for _, args in instructions)


def test_gateway_image_runs_the_app_factory_as_non_root(services):
    instructions = dockerfile_instructions(DOCKER / "gateway.Dockerfile")
    user = [args for word, args in instructions if word == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) > 0, "numeric uid for runAsNonRoot"
    cmd = json.loads([args for word, args in instructions if word == "CMD"][-1])
    # Exec form: python is PID 1 and gets the SIGTERM; server/serve.py reads every uvicorn option.
    assert cmd == ["python", "-m", "server"]
    env = dict(pair.split("=", 1) for word, args in instructions if word == "ENV" for pair in shlex.split(args))
    assert (env["GATEWAY_HOST"], env["GATEWAY_PORT"]) == ("0.0.0.0", "8080")
    assert "GATEWAY_WORKERS" not in env  # one per core unless the deployment says
    from server.app import create_app

    assert callable(create_app)


def test_gateway_image_sets_the_allocator_thresholds_of_the_local_gateway():
    from server.settings import GATEWAY_MALLOC_ENV

    env = dict(
        pair.split("=", 1)
        for word, args in dockerfile_instructions(DOCKER / "gateway.Dockerfile")
        if word == "ENV"
        for pair in shlex.split(args)
    )
    assert {key: env.get(key) for key in GATEWAY_MALLOC_ENV} == GATEWAY_MALLOC_ENV


def test_base_dependencies_contain_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    assert not names & {"torch", "torchvision"}


# ---------------------------------------------------------------------------------------------- prometheus


def test_prometheus_scrapes_gateway_and_triton():
    config = load_yaml(PROMETHEUS)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {name: [t for sc in job["static_configs"] for t in sc["targets"]] for name, job in jobs.items()}
    assert targets == {"gateway": ["gateway:8080"], "triton": ["triton:8002"]}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())


def test_prometheus_config_passes_promtool():
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed (`make system-tools`, or Debian: apt-get install prometheus)")
    result = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- grafana


def test_grafana_provisioning_matches_the_dashboards(services):
    datasources = load_yaml(GRAFANA / "provisioning/datasources/prometheus.yml")["datasources"]
    assert [(d["type"], d["url"]) for d in datasources] == [("prometheus", "http://prometheus:9090")]
    uid = datasources[0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
    providers = load_yaml(GRAFANA / "provisioning/dashboards/dashboards.yml")["providers"]
    mounted = {v["target"]: v["source"] for v in volumes(services["grafana"])}
    for provider in providers:
        source = mounted[provider["options"]["path"]]
        assert (ROOT / source / DASHBOARD.name).is_file()


def test_dashboard_panels_are_well_formed():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_every_dashboard_metric_exists():
    known = gateway_metric_labels() | TRITON_METRICS
    for title, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        for name in names:
            assert name in known, f"{title}: {name} is neither a gateway nor a Triton metric"
        allowed = SCRAPE_LABELS.union(*(known[n] for n in names))
        assert used_labels(expr) <= allowed, f"{title}: unknown label in {expr!r}"


def test_dashboard_shows_what_the_stack_needs():
    exprs = " ".join(expr for _, expr in dashboard_exprs())
    for name in (
        "gateway_requests_total",
        "gateway_stage_seconds_bucket",
        "gateway_in_flight_requests",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_request_success",
        "nv_inference_exec_count",
        "nv_inference_count",
        "nv_gpu_utilization",
    ):
        assert re.search(rf"\b{name}\b", exprs), name
    assert 'status=~"[45].."' in exprs  # the error rate: every status >= 400
    quantiles = [expr for _, expr in dashboard_exprs() if "gateway_stage_seconds_bucket" in expr]
    assert quantiles and all("le" in used_labels(e) and "stage" in used_labels(e) for e in quantiles)
    assert set(STAGES) == {"decode", "preprocess", "inference", "total"}  # the panel's legend promises these
    batch = [expr for _, expr in dashboard_exprs() if "nv_inference_exec_count" in expr]
    assert any(e.index("nv_inference_count") < e.index("/") < e.index("nv_inference_exec_count") for e in batch)


def test_dashboard_queries_parse_with_promtool(tmp_path):
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed (`make system-tools`, or Debian: apt-get install prometheus)")
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- kubernetes

# The manifests use only long-stable APIs (apps/v1, autoscaling/v2); checked against this release's schema.
K8S_VERSION = "1.32.0"


def test_k8s_manifests_validate_against_the_kubernetes_schema_strictly(k8s):
    import kubernetes_validate

    for manifest in k8s.values():
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)  # raises on any unknown or bad field
    # The validator does look: a misspelt field in the gateway's container is refused.
    broken = copy.deepcopy(k8s[("Deployment", "gateway")])
    container(broken)["readinesProbe"] = container(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_k8s_manifests_have_the_expected_objects(k8s):
    assert set(k8s) == {
        ("PersistentVolumeClaim", "model-repository"),
        ("Deployment", "triton"),
        ("Service", "triton-headless"),
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("ConfigMap", "prometheus-gateway-scrape"),
        ("ConfigMap", "prometheus-adapter-gateway"),
    }


def test_k8s_triton_has_a_gpu_probes_and_the_shared_repository(k8s):
    deployment = k8s[("Deployment", "triton")]
    triton = container(deployment)
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8000}
    assert {p["containerPort"] for p in triton["ports"]} == {8000, 8001, 8002}
    assert "--model-repository=/models" in triton["args"]
    mount = next(m for m in triton["volumeMounts"] if m["mountPath"] == "/models")
    assert mount["readOnly"] is True
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in k8s


def test_k8s_triton_service_is_headless(k8s):
    service = k8s[("Service", "triton-headless")]
    assert service["spec"]["clusterIP"] == "None" or service["spec"]["clusterIP"] is None
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}
    pod_labels = k8s[("Deployment", "triton")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_k8s_gateway_resolves_the_headless_service(k8s, monkeypatch):
    gateway = container(k8s[("Deployment", "gateway")])
    env = {e["name"]: e["value"] for e in gateway["env"] if "value" in e}
    grpc_port = next(p["port"] for p in k8s[("Service", "triton-headless")]["spec"]["ports"] if p["name"] == "grpc")
    assert parse_endpoints(env["GATEWAY_TRITON_GRPC_URL"]) == ([], f"triton-headless:{grpc_port}")
    for key, value in env.items():
        assert key.removeprefix("GATEWAY_").lower() in Settings.model_fields, f"{key} is no gateway setting"
        monkeypatch.setenv(key, value)
    Settings()  # values validate
    (keys,) = [e for e in gateway["env"] if e["name"] == "GATEWAY_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"] == {"name": "gateway-api-keys", "key": "keys"}  # no "optional"


def test_k8s_gateway_probes_resources_and_user(k8s):
    deployment = k8s[("Deployment", "gateway")]
    gateway = container(deployment)
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(gateway["resources"][kind])
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    user = [args for word, args in dockerfile_instructions(DOCKER / "gateway.Dockerfile") if word == "USER"][-1]
    assert pod_security["runAsUser"] == int(user.split(":")[0])
    assert gateway["securityContext"]["allowPrivilegeEscalation"] is False
    service = k8s[("Service", "gateway")]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [8080]


def test_k8s_gateway_runs_one_worker_per_core_of_its_cpu_limit(k8s):
    # The default worker count follows the CPU affinity, which a CPU limit (a CFS quota) leaves at the node's.
    gateway = container(k8s[("Deployment", "gateway")])
    assert int(gateway_env(k8s)["GATEWAY_WORKERS"]) == int(gateway["resources"]["limits"]["cpu"])


def gateway_env(k8s) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(k8s[("Deployment", "gateway")])["env"] if "value" in e}


def test_k8s_gateway_drains_within_its_grace_period(k8s, monkeypatch):
    pod = k8s[("Deployment", "gateway")]["spec"]["template"]["spec"]
    gateway = container(k8s[("Deployment", "gateway")])
    settings = gateway_settings(gateway_env(k8s), monkeypatch)
    # preStop runs first, while the Service and ingresses drop the pod; SIGTERM (the drain) comes after it.
    command = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop_s = float(command[1])
    assert pre_stop_s > 0
    # The kubelet kills the container at the end of the grace period (default 30 s), preStop included.
    grace_s = pod.get("terminationGracePeriodSeconds", 30)
    assert grace_s > pre_stop_s + settings.drain_s + longest_request_s(settings), grace_s
    # The readiness probe takes the pod out of the Service within the drain; liveness stays on /healthz,
    # which answers 200 throughout, so a draining pod is not restarted.
    readiness = gateway["readinessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz"
    assert readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3) <= settings.drain_s
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"


def adapter_rules(k8s) -> list[dict]:
    return yaml.safe_load(k8s[("ConfigMap", "prometheus-adapter-gateway")]["data"]["config.yaml"])["rules"]


def gateway_scrape_job(k8s) -> dict:
    [job] = yaml.safe_load(k8s[("ConfigMap", "prometheus-gateway-scrape")]["data"]["gateway-scrape.yml"])[
        "scrape_configs"
    ]
    return job


def test_k8s_hpa_scales_the_gateway_on_requests_in_flight_per_pod_and_on_cpu(k8s, monkeypatch):
    hpa = k8s[("HorizontalPodAutoscaler", "gateway")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in k8s
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    pods, cpu = hpa["spec"]["metrics"]
    # Requests in flight, per pod: the gateway's own gauge.
    assert pods["type"] == "Pods"
    name = pods["pods"]["metric"]["name"]
    assert name == GatewayMetrics().in_flight._name == "gateway_in_flight_requests"
    assert GatewayMetrics().in_flight._type == "gauge"
    assert pods["pods"]["target"]["type"] == "AverageValue"
    # Scaled out well before the gateway turns requests away with 429.
    settings = gateway_settings(gateway_env(k8s), monkeypatch)
    assert 0 < float(pods["pods"]["target"]["averageValue"]) < settings.max_in_flight
    # CPU as the second signal: utilization is relative to the request, without which the HPA cannot act.
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    assert cpu["resource"]["target"]["type"] == "Utilization"
    assert 0 < cpu["resource"]["target"]["averageUtilization"] <= 100
    assert "cpu" in container(k8s[(target["kind"], target["name"])])["resources"]["requests"]


def test_k8s_adapter_serves_the_hpa_metric_per_pod_from_the_gateway_series(k8s):
    hpa_metric = k8s[("HorizontalPodAutoscaler", "gateway")]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    [rule] = [r for r in adapter_rules(k8s) if r["name"]["as"] == hpa_metric]
    assert metric_names(rule["seriesQuery"]) == {hpa_metric}
    assert re.fullmatch(rule["name"]["matches"], hpa_metric)
    # The series' namespace and pod labels are the pod the HPA asks about.
    overrides = rule["resources"]["overrides"]
    assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert {"namespace", "pod"} <= used_labels(rule["seriesQuery"])
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


def test_k8s_prometheus_job_labels_each_gateway_pod_with_its_namespace_and_pod(k8s):
    job = gateway_scrape_job(k8s)
    deployment = k8s[("Deployment", "gateway")]
    assert [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["pod"]
    keep, *relabels = job["relabel_configs"]
    assert keep["action"] == "keep"
    # The kept pods are the gateway's, on its http port.
    pod_values = {
        "__meta_kubernetes_pod_label_app": deployment["spec"]["template"]["metadata"]["labels"]["app"],
        "__meta_kubernetes_pod_container_port_name": container(deployment)["ports"][0]["name"],
    }
    assert re.fullmatch(keep["regex"], ";".join(pod_values[label] for label in keep["source_labels"]))
    targets = {r["target_label"]: r["source_labels"] for r in relabels}
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["pod"] == ["__meta_kubernetes_pod_name"]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["credentials_file"]


def promtool_check(kind: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", "check", kind, str(path)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_k8s_adapter_query_passes_promtool(k8s, tmp_path):
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed (`make system-tools`, or Debian: apt-get install prometheus)")
    [rule] = adapter_rules(k8s)
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", "gateway_in_flight_requests")
        .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"gateway-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    rules = tmp_path / "rules.yml"
    group = {"name": "adapter", "rules": [{"record": "adapter:in_flight", "expr": query}]}
    rules.write_text(yaml.safe_dump({"groups": [group]}))
    result = promtool_check("rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_prometheus_job_passes_promtool(k8s, tmp_path):
    if not shutil.which("promtool"):
        pytest.skip("promtool is not installed (`make system-tools`, or Debian: apt-get install prometheus)")
    job = gateway_scrape_job(k8s)
    key = tmp_path / "key"  # promtool checks that the credentials file exists
    key.write_text("k")
    job["authorization"]["credentials_file"] = str(key)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": [job]}))
    result = promtool_check("config", config)
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (as Debian's is)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_images_are_the_ones_compose_builds(k8s, services):
    built = {service["image"] for service in services.values() if "build" in service}
    for kind, name in (("Deployment", "triton"), ("Deployment", "gateway")):
        assert container(k8s[(kind, name)])["image"] in built


def test_k8s_triton_has_a_writable_engine_cache_where_publish_points_the_tensorrt_provider(k8s):
    from builder.model_config import DEFAULT_TRT_CACHE_ROOT

    deployment = k8s[("Deployment", "triton")]
    # ONNX Runtime creates only the last folder of trt_engine_cache_path (<root>/<model>): the root must exist.
    mount = next(m for m in container(deployment)["volumeMounts"] if m["mountPath"] == DEFAULT_TRT_CACHE_ROOT)
    assert not mount.get("readOnly")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert {"emptyDir", "persistentVolumeClaim"} & set(volume)


def test_k8s_triton_has_a_startup_probe_that_waits_for_engine_builds(k8s):
    triton = container(k8s[("Deployment", "triton")])
    startup = triton["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/live", "port": 8000}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= ENGINE_BUILD_BUDGET_S
    # The liveness probe starts once the startup probe has passed: no guessed initial delay.
    assert "initialDelaySeconds" not in triton["livenessProbe"]
