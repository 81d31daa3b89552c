"""`python -m client`: classify images through the gateway or Triton's gRPC endpoint."""

import sys

from client import main

sys.exit(main())
