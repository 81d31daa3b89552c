"""Load tests with locust: scenarios (`locustfile.py`), a runner (`run.py`) and the report (`report.py`)."""
