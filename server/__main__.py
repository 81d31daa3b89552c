"""`python -m server`: the gateway, in GATEWAY_WORKERS worker processes (server/serve.py)."""

import sys

from .serve import main

# Worker processes are spawned: they import this module again, under another name, and must not serve.
if __name__ == "__main__":
    sys.exit(main())
