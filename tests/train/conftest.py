"""Shared set-up of the trainer tests: one data-set cache for the session (the tests that check
the cache itself use their own directory). The small, fast training options are in
train_helpers.py."""
import os

import pytest

pytest.importorskip("sklearn", reason="the trainer's data sets need scikit-learn")


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    old = os.environ.get("GRADOPS_DATA_CACHE")
    os.environ["GRADOPS_DATA_CACHE"] = str(tmp_path_factory.mktemp("gradops_data"))
    yield
    if old is None:
        os.environ.pop("GRADOPS_DATA_CACHE", None)
    else:
        os.environ["GRADOPS_DATA_CACHE"] = old
