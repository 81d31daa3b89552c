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
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.preprocess import PARAMETER_PREFIX as PREPROCESS_PREFIX
from server.rollout import (
    CANARY,
    DEFAULT_SHADOW_PERCENT,
    MAX_HEADER_NAME,
    REFERENCE_MODEL,
    REFERENCE_PERCENT,
    STABLE,
    Guard,
    Reference,
    Rollout,
    new_rollout_id,
    version_of,
)

from . import model_config
from .errors import RolloutError
from .model_config import ModelConfig

LABELS_PARAMETER = "labels"
MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # what the gateway's routes accept
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
    shadow_percent: float | None = None,
    guard: dict[str, float] | None = None,
) -> Rollout:
    """Serve `version` (default: the newest) to `percent` of requests beside the version served now.

    With a rollout under way, changes its percentage (and sticky header, shadow share, guard rails) instead.
    Either way the rollout gets a new id: a canary a gateway halted is served again.
    `guard`: rails to set (Guard's field names), the others from the rollout under way, else the defaults.
    """
    _check_percent(percent)
    if shadow_percent is not None and not (math.isfinite(shadow_percent) and 0 <= shadow_percent <= 100):
        raise RolloutError(f"shadow percentage {shadow_percent:g} is not between 0 and 100")
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
        rollout = dataclasses.replace(
            current,
            canary_percent=percent,
            sticky_header=sticky,
            shadow_percent=current.shadow_percent if shadow_percent is None else shadow_percent,
            guard=_guard(current.guard, guard),
            id=new_rollout_id(),
        )
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
        if not others and config.version_policy == "specific":
            # Named alone (a promote or an abort chose it): an older version was retired, not kept serving.
            raise RolloutError(
                f"version {canary} of {name!r} is already the only version served: publish a newer one to roll "
                "out beside it, or name an older one with --version to roll back to it"
            )
        if not others and not older:
            raise RolloutError(f"model {name!r} has no version to keep serving beside version {canary}")
        stable = max(others) if others else max(older)
        rollout = Rollout(
            stable,
            canary,
            percent,
            (sticky_header or "").lower(),
            shadow_percent=DEFAULT_SHADOW_PERCENT if shadow_percent is None else shadow_percent,
            guard=_guard(None, guard),
            id=new_rollout_id(),
        )
        _check_same_interface(model_dir, config, rollout.versions)
    model_config.write_config(model_dir, model_config.with_rollout(config, rollout))
    return rollout


def _guard(current: Guard | None, changes: dict[str, float] | None) -> Guard:
    try:
        return dataclasses.replace(current or Guard(), **(changes or {}))
    except ValueError as e:
        raise RolloutError(f"guard rail: {e}") from None


def _check_reference(model_dir: Path, config: ModelConfig, reference: str) -> None:
    """The reference must be in the repository and take what the model takes: the gateway sends it the same
    preprocessed tensor and compares class by class."""
    reference_dir = model_dir.parent / reference
    if not (reference_dir / "config.pbtxt").is_file():
        raise RolloutError(f"--reference {reference!r} is not a model in repository {model_dir.parent}")
    other = model_config.read_config(reference_dir)
    inputs = [(t.data_type, t.dims) for t in config.inputs]
    if _interface(dict(other.parameters)) != _interface(dict(config.parameters)):
        raise RolloutError(f"--reference {reference!r} has other preprocessing or labels than {model_dir.name!r}")
    if [(t.data_type, t.dims) for t in other.inputs] != inputs:
        raise RolloutError(f"--reference {reference!r} takes another input than {model_dir.name!r}")


def set_reference(
    repository: Path, name: str, reference: str, percent: float | None = None, must_fit: bool = False
) -> Reference | None:
    """Compare `name`'s answers with model `reference` on `percent` of classify requests ("": no more).
    `must_fit` (`builder rollout --reference`): refuse a reference missing from the repository or taking other
    inputs. A build publishes its own reference just before naming it, and the gateway skips one that does
    not fit, so the build does not ask."""
    model_dir, config, _ = _model_dir(repository, name)
    parameters = {k: v for k, v in config.parameters.items() if k not in (REFERENCE_MODEL, REFERENCE_PERCENT)}
    chosen = None
    if reference:
        if reference == name:
            raise RolloutError(f"model {name!r} cannot be its own reference")
        if not re.fullmatch(MODEL_NAME, reference):
            raise RolloutError(f"--reference {reference!r} is not a model name")
        try:
            chosen = Reference(reference) if percent is None else Reference(reference, percent)
        except ValueError as e:
            raise RolloutError(str(e)) from None
        if must_fit:
            _check_reference(model_dir, config, reference)
        parameters.update(chosen.to_parameters())
    model_config.write_config(model_dir, dataclasses.replace(config, parameters=parameters))
    return chosen


def _finish(
    repository: Path, name: str, promote: bool, before_write: Callable[[Rollout | None], None] | None = None
) -> int:
    model_dir, config, present = _model_dir(repository, name)
    if STABLE not in config.parameters and CANARY not in config.parameters:
        raise RolloutError(f"model {name!r} has no rollout under way")
    # Only the version kept is read: a hand-edited guard rail or shadow share the gateway cannot follow
    # must not stand in the way of the one command that removes them.
    key = CANARY if promote else STABLE
    keep = version_of(config.parameters, key)
    if keep is None:
        value = config.parameters.get(key, "")
        raise RolloutError(f"model {name!r}: {key} {value!r} is not a version; edit config.pbtxt")
    # Served alone, a version without its folder would leave the model with nothing to load.
    _check_present(name, (keep,), present, repository)
    if before_write is not None:
        try:
            current = model_config.rollout_of(config)
        except RolloutError:
            current = None  # unreadable: no gateway follows it
        before_write(current)
    model_config.write_config(model_dir, model_config.serving_only(config, keep))
    return keep


def promote(repository: Path, name: str, before_write: Callable[[Rollout | None], None] | None = None) -> int:
    """The canary becomes the only version served; returns it. `before_write(rollout)` runs once the promote
    is known to be possible and before anything is written (None: the rollout cannot be read); it stops the
    promote by raising."""
    return _finish(repository, name, promote=True, before_write=before_write)


def abort(repository: Path, name: str) -> int:
    """Back to the stable version alone; returns it."""
    return _finish(repository, name, promote=False)


def state(repository: Path, name: str) -> dict[str, Any]:
    """What the repository says: the versions served and the rollout, if one is under way."""
    _, config, present = _model_dir(repository, name)
    unreadable = None
    try:
        rollout = model_config.rollout_of(config)
    except RolloutError as e:
        # Shown, not refused: --status is how one finds out, --abort or --promote how one gets out.
        rollout, unreadable = None, f"{e}; --abort or --promote ends it"
    try:
        reference = Reference.from_parameters(config.parameters)
    except ValueError:
        reference = None  # a hand-edited percentage the gateways ignore too
    return {
        "model": name,
        "served": model_config.served_versions(config, present),
        "rollout": dataclasses.asdict(rollout) if rollout else None,
        "reference": dataclasses.asdict(reference) if reference else None,
        **({"rollout_unreadable": unreadable} if unreadable else {}),
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


# A series every gateway exports from its start, whatever it has served (server/metrics.py): an answer without
# it comes from another service (Triton's metrics, the stack's, anything else that serves /metrics).
GATEWAY_FAMILY = "gateway_request_bytes"


def traffic(metrics_text: str, name: str, rollout_id: str | None = None) -> dict[str, dict[str, Any]]:
    """Per version of `name`, from a gateway's /metrics: requests, errors (5xx), p50 and p99 in ms; where
    shadow requests compared it, top-1 agreement per `against` ("stable", "reference"); where the gateway
    halted it as the canary of rollout `rollout_id`, the guard rail it broke ("halted"), and the requests of
    that rollout its guard rails judged ("judged"). Another rollout's are not shown: the gateway drops a halt
    only once a request shows it the new rollout. ValueError where the text is not a gateway's metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    versions: dict[str, dict[str, Any]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    compared: dict[tuple[str, str], list[float]] = {}

    def entry(version: str) -> dict[str, Any]:
        return versions.setdefault(version, {"requests": 0, "errors": 0})

    gateway = False
    for family in text_string_to_metric_families(metrics_text):
        gateway = gateway or (family.name == GATEWAY_FAMILY and bool(family.samples))
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != name:
                continue
            version = labels.get("version", "")
            if sample.name == "gateway_version_requests_total":
                entry(version)["requests"] += int(sample.value)
                if labels.get("status", "").startswith("5"):
                    entry(version)["errors"] += int(sample.value)
            elif sample.name == "gateway_version_request_seconds_bucket":
                buckets.setdefault(version, []).append((float(labels["le"]), sample.value))
            elif sample.name in ("gateway_shadow_comparisons_total", "gateway_shadow_agreements_total"):
                counts = compared.setdefault((version, labels.get("against", "")), [0.0, 0.0])
                counts[sample.name == "gateway_shadow_agreements_total"] += sample.value
            # Set to 1 when halted, 0 once another rollout replaces it: anything but 0 is taken as a halt.
            elif sample.name == "gateway_rollout_canary_halted" and sample.value != 0:
                if rollout_id is not None and labels.get("rollout") == rollout_id:
                    entry(version)["halted"] = labels.get("reason", "")
            elif sample.name == "gateway_rollout_canary_requests_total":
                if rollout_id is not None and labels.get("rollout") == rollout_id:
                    entry(version)["judged"] = int(sample.value)
    if not gateway:
        raise ValueError(f"no {GATEWAY_FAMILY} series: another service's metrics, or none")
    for version, item in versions.items():
        for key, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
            value = quantile(buckets.get(version, []), q)
            item[key] = None if value is None else round(value * 1000, 2)
    for (version, against), (images, agreeing) in sorted(compared.items()):
        if images:
            agreement = entry(version).setdefault("agreement", {})
            agreement[against] = {"images": int(images), "top1": round(agreeing / images, 4)}
    return versions


class GatewayUnanswered(RolloutError):
    """The gateway could not be asked, or its answer was not a gateway's metrics."""


def _gateway_traffic(
    gateway_url: str, api_key: str | None, name: str, rollout_id: str | None
) -> dict[str, dict[str, Any]]:
    """traffic() from the gateway at `gateway_url`."""
    text = _gateway_metrics(gateway_url, api_key)
    try:
        return traffic(text, name, rollout_id)
    except (ValueError, KeyError, OverflowError) as e:  # not Prometheus's text format, or not the gateway's series
        raise GatewayUnanswered(f"{gateway_url.rstrip('/')}/metrics is not a gateway's metrics: {e!r}") from e


# For the whole answer, not each read: a server that trickles bytes would otherwise hold the command for ever.
METRICS_DEADLINE_S = 15.0
# A gateway's /metrics is some tens of kB per model; an answer past this is not one.
MAX_METRICS_BYTES = 32 * 1024 * 1024


def _gateway_metrics(gateway_url: str, api_key: str | None) -> str:
    """The text of the gateway's /metrics, within METRICS_DEADLINE_S and MAX_METRICS_BYTES; GatewayUnanswered
    for anything else (unreachable, refused, a bad URL, too slow, too large)."""
    import threading

    import httpx

    # httpx logs every request at INFO, which the CLI's logging would print before the JSON.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = gateway_url.rstrip("/") + "/metrics"
    given_up = threading.Event()
    outcome: list[str | Exception] = []

    def fetch() -> None:
        try:
            with httpx.stream("GET", url, headers=headers, timeout=10) as response:
                response.raise_for_status()
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_METRICS_BYTES:
                        raise GatewayUnanswered(f"{url} sent more than {MAX_METRICS_BYTES >> 20} MiB: not a gateway's")
                    if given_up.is_set():
                        return
                outcome.append(body.decode(response.encoding or "utf-8", errors="replace"))
        except GatewayUnanswered as e:
            outcome.append(e)
        except httpx.HTTPStatusError as e:
            answer = e.response
            outcome.append(GatewayUnanswered(f"{url} answered {answer.status_code} {answer.reason_phrase}"))
        except Exception as e:  # a bad URL, a refused connection, a broken stream
            outcome.append(GatewayUnanswered(f"cannot read the gateway's metrics at {url}: {e}"))

    # A daemon thread, so that a server that never finishes cannot keep the process from exiting either.
    reader = threading.Thread(target=fetch, name="gateway-metrics", daemon=True)
    reader.start()
    reader.join(METRICS_DEADLINE_S)
    if reader.is_alive() or not outcome:
        given_up.set()
        raise GatewayUnanswered(f"the gateway at {url} sent no whole answer within {METRICS_DEADLINE_S:g} s")
    result = outcome[0]
    if isinstance(result, Exception):
        raise result
    return result


def status(repository: Path, name: str, gateway_url: str, api_key: str | None = None) -> dict[str, Any]:
    """The rollout's state, and per version what one gateway has seen since it started."""
    report = state(repository, name)
    current = report["rollout"]
    report["versions"] = _gateway_traffic(gateway_url, api_key, name, current["id"] if current else None)
    return report


def canary_verdict(gateway_url: str, api_key: str | None, name: str, current: Rollout) -> tuple[str | None, int]:
    """What the gateway at `gateway_url` says of `current`'s canary: the guard rail whose breach halted it
    (None: not halted), and how many of its requests in this rollout the rails judged. GatewayUnanswered where
    the gateway cannot be asked or read."""
    seen = _gateway_traffic(gateway_url, api_key, name, current.id).get(str(current.canary), {})
    return seen.get("halted"), seen.get("judged", 0)
