"""Builder stages on tiny models trained in process."""

from tests.fixtures import small_digits, tiny_run  # noqa: F401  (session fixtures for this tier)
