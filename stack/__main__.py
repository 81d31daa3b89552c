"""`python -m stack` (make serve): Triton and the gateway on the current model repository until Ctrl-C.

Either process is started again when it exits unexpectedly (STACK_* settings: back-off, give-up rule,
the port of the restart counter); SIGINT or SIGTERM stops the gateway, drained, then Triton, and a second
one stops them at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from server.settings import Settings, SettingsError, load_settings

from .launcher import LaunchError
from .settings import StackSettings, TritonSettings
from .supervisor import RestartCounter, RestartPolicy, StopSignals, Supervisor, replica_processes


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", help="model repository (default: $TRITON_MODEL_REPOSITORY or model_repository)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        triton_settings = load_settings(
            TritonSettings, **({"model_repository": args.repository} if args.repository else {})
        )
        gateway_settings = load_settings(Settings)
        stack_settings = load_settings(StackSettings)
    except SettingsError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    if gateway_settings.host not in ("127.0.0.1", "localhost", "::1") and not (
        gateway_settings.api_keys or gateway_settings.api_keys_file
    ):
        logging.warning(
            "the gateway listens on %s with no API key: anyone who reaches this host can use it; "
            "set GATEWAY_API_KEYS or GATEWAY_API_KEYS_FILE",
            gateway_settings.host,
        )
    tritons, gateway = replica_processes(
        triton_settings,
        replicas=stack_settings.triton_replicas,
        gateway_host=gateway_settings.host,
        gateway_port=gateway_settings.port,
    )

    def serving() -> None:
        logging.info(
            "serving %s: gateway %s, %s; Ctrl-C stops",
            tritons[0].model_repository,
            gateway.url,
            "; ".join(f"{t.name} http {t.http_url} grpc {t.grpc_url} metrics {t.metrics_url}" for t in tritons),
        )

    with StopSignals() as signals:
        try:
            restarts = RestartCounter(
                [t.name for t in [*tritons, gateway]],
                host=stack_settings.metrics_host,
                port=stack_settings.metrics_port,
            )
            supervisor = Supervisor(
                [*tritons, gateway],
                signals,
                policy=lambda: RestartPolicy.from_settings(stack_settings),
                restarts=restarts,
            )
            return supervisor.run(on_ready=serving)
        except LaunchError as e:
            print(f"serve: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
