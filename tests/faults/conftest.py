"""The fault suite's shared set-up: one data-set cache for the session, filled once (the
subprocesses inherit it through ``GRADOPS_DATA_CACHE``)."""
import os

import pytest

pytest.importorskip("sklearn", reason="the trainer's data sets need scikit-learn")


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    old = os.environ.get("GRADOPS_DATA_CACHE")
    d = tmp_path_factory.mktemp("fault_data")
    os.environ["GRADOPS_DATA_CACHE"] = str(d)
    from gradops.train.data import load_dataset
    load_dataset("digits", None, 0)
    yield d
    if old is None:
        os.environ.pop("GRADOPS_DATA_CACHE", None)
    else:
        os.environ["GRADOPS_DATA_CACHE"] = old
