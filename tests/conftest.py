"""Shared fixtures. Each stage's fixtures live in tests/fixtures_<stage>.py and are loaded here."""

import os

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

pytest_plugins = [
    name for name in ("tests.fixtures_data", "tests.fixtures_prep", "tests.fixtures_train")
    if os.path.exists(os.path.join(os.path.dirname(__file__), name.split(".")[1] + ".py"))
]
