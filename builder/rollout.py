"""Canary rollouts of a published version, with the model repository as the only record.

A rollout is written into the model's config.pbtxt: Triton's version policy serves exactly the stable and
the canary version (`specific`), and `parameters` say which is which and the canary's share of requests.
Every gateway reads that config through Triton (server/rollout.py routes by it), so all replicas follow
the repository and a restart loses nothing. Each change is one atomic rename of config.pbtxt; a polling
Triton reloads the model without losing availability, and gateways follow within their config cache's
lifetime (GATEWAY_MODEL_INFO_TTL_S).

`status` reads the gateway's /metrics (per version: requests, errors, latency quantiles from its
histogram): Triton's statistics hold cumulative sums only, no quantiles.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from server.preprocess import PARAMETER_PREFIX as PREPROCESS_PREFIX
from server.rollout import MAX_HEADER_NAME, Rollout

from . import model_config
from .errors import RolloutError
from .model_config import ModelConfig

LABELS_PARAMETER = "labels"
HEADER_NAME = "abcdefghijklmnopqrstuvwxyz0123456789-_"


def _check_percent(percent: float) -> None:
    if not (math.isfinite(percent) and 0 <= percent <= 100):
        raise RolloutError(f"canary percentage {percent:g} is not between 0 and 100")


def _interface(parameters: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in parameters.items() if k.startswith(PREPROCESS_PREFIX) or k == LABELS_PARAMETER}


def _check_same_interface(model_dir: Path, config: ModelConfig, versions: tuple[int, ...]) -> None:
    """The versions will share `config`'s preprocessing and labels: refuse one published with others
    (as its build.json records them)."""
    wanted = _interface(dict(config.parameters))
    for version in versions:
        try:
            record = json.loads((model_dir / str(version) / "build.json").read_text())
            published = _interface(record["config"]["parameters"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no record (a version copied in by hand): nothing to compare with
        if published != wanted:
            raise RolloutError(
                f"version {version} of {model_dir.name!r} was published with other preprocessing or labels "
                f"than the model's config, and both versions would share that config"
            )


def _check_present(name: str, versions: tuple[int, ...], present: list[int], repository: Path) -> None:
    missing = [v for v in versions if v not in present]
    if missing:
        listed = ", ".join(map(str, missing))
        raise RolloutError(
            f"the rollout of {name!r} names version {listed}, which has no folder in repository {repository}"
        )


def _model_dir(repository: Path, name: str) -> tuple[Path, ModelConfig, list[int]]:
    model_dir = Path(repository) / name
    config = model_config.read_config(model_dir)
    return model_dir, config, model_config.present_versions(model_dir)


def start(
    repository: Path,
    name: str,
    percent: float,
    version: int | None = None,
    sticky_header: str | None = None,
) -> Rollout:
    """Serve `version` (default: the newest) to `percent` of requests beside the version served now.

    With a rollout under way, changes its percentage (and sticky header) instead.
    """
    _check_percent(percent)
    # "" turns a sticky rollout back into one drawn per request.
    if sticky_header and set(sticky_header.lower()) - set(HEADER_NAME):
        raise RolloutError(f"--sticky-header {sticky_header!r} is not an HTTP header name")
    if sticky_header and len(sticky_header) > MAX_HEADER_NAME:
        raise RolloutError(f"--sticky-header is {len(sticky_header)} characters long; at most {MAX_HEADER_NAME}")
    model_dir, config, present = _model_dir(repository, name)
    current = model_config.rollout_of(config)
    if current is not None:
        if version is not None and version != current.canary:
            raise RolloutError(
                f"version {current.canary} of {name!r} is being rolled out: promote or abort it before "
                f"rolling out version {version}"
            )
        _check_present(name, current.versions, present, repository)
        sticky = current.sticky_header if sticky_header is None else sticky_header.lower()
        rollout = dataclasses.replace(current, canary_percent=percent, sticky_header=sticky)
    else:
        if len(present) < 2:
            what = "only one version" if present else "no version"
            raise RolloutError(f"model {name!r} has {what}: a rollout needs two")
        canary = present[-1] if version is None else version
        if canary not in present:
            raise RolloutError(f"version {canary} of {name!r} is not in repository {repository}")
        # The version serving now stays the stable one; where the canary is already the only one served (a
        # plain publish under the `latest` policy), the version before it.
        others = [v for v in model_config.served_versions(config, present) if v != canary]
        older = [v for v in present if v < canary]
        if not others and not older:
            raise RolloutError(f"model {name!r} has no version to keep serving beside version {canary}")
        stable = max(others) if others else max(older)
        rollout = Rollout(stable, canary, percent, (sticky_header or "").lower())
        _check_same_interface(model_dir, config, rollout.versions)
    model_config.write_config(model_dir, model_config.with_rollout(config, rollout))
    return rollout


def _finish(repository: Path, name: str, promote: bool) -> int:
    model_dir, config, present = _model_dir(repository, name)
    rollout = model_config.rollout_of(config)
    if rollout is None:
        raise RolloutError(f"model {name!r} has no rollout under way")
    keep = rollout.canary if promote else rollout.stable
    # Served alone, a version without its folder would leave the model with nothing to load.
    _check_present(name, (keep,), present, repository)
    model_config.write_config(model_dir, model_config.serving_only(config, keep))
    return keep


def promote(repository: Path, name: str) -> int:
    """The canary becomes the only version served; returns it."""
    return _finish(repository, name, promote=True)


def abort(repository: Path, name: str) -> int:
    """Back to the stable version alone; returns it."""
    return _finish(repository, name, promote=False)


def state(repository: Path, name: str) -> dict[str, Any]:
    """What the repository says: the versions served and the rollout, if one is under way."""
    _, config, present = _model_dir(repository, name)
    rollout = model_config.rollout_of(config)
    return {
        "model": name,
        "served": model_config.served_versions(config, present),
        "rollout": dataclasses.asdict(rollout) if rollout else None,
    }


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a Prometheus histogram, (upper bound, cumulative count) pairs, interpolated
    linearly within its bucket as PromQL's histogram_quantile does; None without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bound: that bound is all that is known
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def traffic(metrics_text: str, name: str) -> dict[str, dict[str, Any]]:
    """Per version of `name`, from a gateway's /metrics: requests, errors (5xx), p50 and p99 in ms."""
    from prometheus_client.parser import text_string_to_metric_families

    versions: dict[str, dict[str, Any]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != name:
                continue
            version = labels.get("version", "")
            if sample.name == "gateway_version_requests_total":
                entry = versions.setdefault(version, {"requests": 0, "errors": 0})
                entry["requests"] += int(sample.value)
                if labels.get("status", "").startswith("5"):
                    entry["errors"] += int(sample.value)
            elif sample.name == "gateway_version_request_seconds_bucket":
                buckets.setdefault(version, []).append((float(labels["le"]), sample.value))
    for version, entry in versions.items():
        for key, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
            value = quantile(buckets.get(version, []), q)
            entry[key] = None if value is None else round(value * 1000, 2)
    return versions


def status(repository: Path, name: str, gateway_url: str, api_key: str | None = None) -> dict[str, Any]:
    """The rollout's state, and per version what one gateway has seen since it started."""
    import httpx

    report = state(repository, name)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = gateway_url.rstrip("/") + "/metrics"
    try:
        response = httpx.get(url, headers=headers, timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as e:
        raise RolloutError(f"cannot read the gateway's metrics at {url}: {e}") from e
    report["versions"] = traffic(response.text, name)
    return report
