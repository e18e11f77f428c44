"""Test-wide settings.

Every test runs with one intra-op thread. The automatic thread policy (cdeq.engine.threads) takes
OMP_NUM_THREADS as the user's choice, so runs that a test compares bit for bit sum in the same
order whatever else the machine is doing. Tests of the policy itself unset it with monkeypatch.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
