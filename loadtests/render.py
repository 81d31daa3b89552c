"""A Summary for people: `summary.md` to read and `latency.png` to look at."""

from __future__ import annotations

import math
from pathlib import Path

from .report import Summary, TritonLoad, saturation_step


def _ms(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _headline(summary: Summary) -> str:
    total = summary.total
    images = sum(load.inferences for load in summary.triton)
    images_part = f" ({images / summary.duration_s:.1f} images/s at Triton)" if images and summary.duration_s else ""
    users = max((p.users for p in summary.history), default=0)
    return (
        f"**{total.rps:.1f} requests/s**{images_part} with up to {users} users over "
        f"{summary.duration_s:.0f} s; latency p50 {_ms(total.p50_ms)} ms, p95 {_ms(total.p95_ms)} ms, "
        f"**p99 {_ms(total.p99_ms)} ms**; {total.failures} failed of {total.requests} "
        f"({total.failure_ratio:.2%})."
    )


def _requests_table(summary: Summary) -> list[str]:
    lines = [
        "| request | count | failed | req/s | mean ms | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in [*summary.requests, summary.total]:
        lines.append(
            f"| {r.name} | {r.requests} | {r.failures} | {r.rps:.1f} | {_ms(r.mean_ms)} | {_ms(r.p50_ms)} "
            f"| {_ms(r.p95_ms)} | {_ms(r.p99_ms)} |"
        )
    return lines


def _ramp_section(ramp: dict) -> list[str]:
    budget = ramp.get("budget_ms")
    lines = ["## Saturation ramp", ""]
    best = saturation_step(ramp)
    steps = ramp.get("steps", [])
    if best and all(s["within_budget"] for s in steps):
        # The ramp ran out of users before latency crossed the budget: the server was not saturated.
        lines.append(
            f"Every step stayed within the p99 budget of {budget:.0f} ms up to the ramp's cap of "
            f"{steps[-1]['users']} users: saturation is above **{best['rps']:.1f} requests/s**; "
            "raise --ramp-max-users to find it."
        )
    elif best:
        lines.append(
            f"Saturation: **{best['rps']:.1f} requests/s at {best['users']} users** (p99 "
            f"{_ms(best['p99_ms'])} ms, budget {budget:.0f} ms). At 80% of it, "
            f"{0.8 * best['rps']:.1f} requests/s, is where to measure the latency users will see."
        )
    else:
        lines.append(f"No step stayed within the p99 budget of {budget:.0f} ms.")
    lines += ["", "| users | req/s | p50 ms | p99 ms | failed | within budget |", "|---|---|---|---|---|---|"]
    for s in ramp.get("steps", []):
        lines.append(
            f"| {s['users']} | {s['rps']:.1f} | {_ms(s['p50_ms'])} | {_ms(s['p99_ms'])} | {s['failures']} "
            f"| {'yes' if s['within_budget'] else 'no'} |"
        )
    return lines + [""]


def batch_size_ranges(batch_sizes: dict[int, int]) -> dict[str, tuple[int, int]]:
    """Executions and images per range of batch sizes (1, 2, 3-4, 5-8, ...): a table that fits a screen."""
    ranges: dict[str, tuple[int, int]] = {}
    for size, count in sorted(batch_sizes.items()):
        upper = 1 << max(size - 1, 0).bit_length()  # the power of two at or above size
        lower = upper // 2 + 1 if upper > 2 else upper
        label = str(upper) if lower == upper else f"{lower}-{upper}"
        executions, images = ranges.get(label, (0, 0))
        ranges[label] = (executions + count, images + size * count)
    return ranges


def _triton_lines(load: TritonLoad) -> list[str]:
    per_request = load.queue_ms + load.compute_ms
    queue_share = load.queue_ms / per_request if per_request else 0.0
    lines = [
        f"Triton, model `{load.model}`: {load.requests} requests carrying {load.inferences} images ran as "
        f"{load.executions} executions: **mean batch {load.mean_batch:.2f}**. Per request, "
        f"**{_ms(load.queue_ms)} ms waiting in the queue** against **{_ms(load.compute_ms)} ms of compute** "
        f"({queue_share:.0%} of Triton's time is queueing).",
    ]
    if load.batch_sizes:
        executions = sum(load.batch_sizes.values())
        images = sum(size * count for size, count in load.batch_sizes.items())
        lines += [
            "",
            f"Batch sizes Triton formed (its statistics API, {executions} executions):",
            "",
            "| batch size | executions | share of executions | share of images |",
            "|---|---|---|---|",
        ]
        for label, (count, batched) in batch_size_ranges(load.batch_sizes).items():
            lines.append(f"| {label} | {count} | {count / executions:.0%} | {batched / images:.0%} |")
    return lines + [""]


def _where_time_goes(summary: Summary) -> list[str]:
    lines = ["## Where the time goes", ""]
    if summary.stages:
        lines += [
            "Inside the gateway (its `gateway_stage_seconds` histogram; quantiles interpolated in buckets):",
            "",
            "| stage | requests | mean ms | p50 ms | p99 ms |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {s.stage} | {s.count} | {_ms(s.mean_ms)} | {_ms(s.p50_ms)} | {_ms(s.p99_ms)} |" for s in summary.stages
        ]
        total_stage = next((s for s in summary.stages if s.stage == "total"), None)
        if total_stage and not math.isnan(summary.total.mean_ms):
            outside = summary.total.mean_ms - total_stage.mean_ms
            lines += [
                "",
                f"Mean client latency {_ms(summary.total.mean_ms)} ms, of which {_ms(total_stage.mean_ms)} ms "
                f"inside the gateway and {_ms(outside)} ms in HTTP, the network and the load generator.",
            ]
        lines.append("")
    if summary.gateway_statuses:
        lines += [
            "Gateway answers by status: " + ", ".join(f"{k}: {v}" for k, v in summary.gateway_statuses.items()),
            "",
        ]
    for load in summary.triton:
        lines += _triton_lines(load)
    if not summary.stages and not summary.triton:
        lines += ["No server metrics were scraped (targets unreachable).", ""]
    return lines


def render_markdown(summary: Summary, problems: list[str]) -> str:
    verdict = "PASSED" if not problems else "FAILED: " + "; ".join(problems)
    lines = [
        f"# Load test of the {summary.target}",
        "",
        _headline(summary),
        "",
        f"Thresholds: {verdict}.",
        "",
        "![throughput, latency and errors over time](latency.png)",
        "",
        "## Requests",
        "",
    ]
    lines += _requests_table(summary) + [""]
    if summary.ramp:
        lines += _ramp_section(summary.ramp)
    lines += _where_time_goes(summary)
    lines += ["## Settings", ""] + [f"- {key}: `{value}`" for key, value in summary.settings.items()]
    return "\n".join(lines) + "\n"


def plot_latency(summary: Summary, path: Path, *, max_p99_ms: float | None = None) -> None:
    """Throughput (with users), p50/p95/p99 and error rate over time, stacked on one time axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    history = summary.history
    t = [p.elapsed_s for p in history]
    fig, (throughput, latency, errors) = plt.subplots(3, 1, sharex=True, figsize=(9, 8), constrained_layout=True)
    fig.suptitle(
        f"Load test of the {summary.target}: {summary.total.rps:.1f} req/s, p99 {_ms(summary.total.p99_ms)} ms"
    )

    throughput.plot(t, [p.rps for p in history], color="tab:blue", label="requests/s (per second)")
    throughput.set_ylabel("requests/s")
    users_axis = throughput.twinx()
    users_axis.step(t, [p.users for p in history], where="post", color="tab:gray", linestyle="--", label="users")
    users_axis.set_ylabel("users")
    handles = throughput.get_legend_handles_labels()[0] + users_axis.get_legend_handles_labels()[0]
    throughput.legend(handles, [h.get_label() for h in handles], loc="upper left")

    for name, color in (("p50", "tab:green"), ("p95", "tab:orange"), ("p99", "tab:red")):
        latency.plot(t, [getattr(p, f"{name}_ms") for p in history], color=color, label=name)
    budget = max_p99_ms or (summary.ramp or {}).get("budget_ms")
    if budget:
        latency.axhline(budget, color="black", linestyle=":", label=f"p99 limit {budget:.0f} ms")
    latency.set_ylabel("latency ms (10 s window)")
    latency.legend(loc="upper left")

    error_percent = [100 * p.failures_per_s / p.rps if p.rps else 0.0 for p in history]
    errors.plot(t, error_percent, color="tab:red")
    errors.set_ylabel("errors %")
    errors.set_xlabel("seconds since start")
    errors.set_ylim(0, max(1.0, 1.2 * max(error_percent, default=0.0)))  # a clean run reads as a flat 0 %
    for axis in (throughput, latency, errors):
        axis.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
