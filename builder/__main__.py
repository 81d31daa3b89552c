"""`python -m builder ...`, the same as the `builder` command; torchrun starts it as `torchrun ... -m builder`."""

import sys

from .cli import main

sys.exit(main())
