"""`python -m stack` (make serve): Triton and the gateway on the current model repository until Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from server.settings import Settings

from .launcher import LaunchError
from .settings import TritonSettings
from .supervisor import local_stack


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    parser.add_argument("--repository", help="model repository (default: $TRITON_MODEL_REPOSITORY or model_repository)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    triton_settings = TritonSettings(**({"model_repository": args.repository} if args.repository else {}))
    gateway_settings = Settings()
    if gateway_settings.host not in ("127.0.0.1", "localhost", "::1") and not (
        gateway_settings.api_keys or gateway_settings.api_keys_file
    ):
        logging.warning(
            "the gateway listens on %s with no API key: anyone who reaches this host can use it; "
            "set GATEWAY_API_KEYS or GATEWAY_API_KEYS_FILE",
            gateway_settings.host,
        )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with local_stack(triton_settings, gateway_host=gateway_settings.host, gateway_port=gateway_settings.port) as (
            triton,
            gateway,
        ):
            logging.info(
                "serving %s: gateway %s, Triton http %s grpc %s metrics %s; Ctrl-C stops",
                triton.model_repository,
                gateway.url,
                triton.http_url,
                triton.grpc_url,
                triton.metrics_url,
            )
            while not stop.wait(1.0):
                for process in (triton, gateway):
                    if not process.running():
                        logging.error("%s exited; see %s", process.name, process.log_path)
                        return 1
    except LaunchError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    logging.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
