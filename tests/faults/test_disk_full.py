"""A disk that fills mid-write, simulated without root: ``RLIMIT_FSIZE`` in the subprocess makes
every write past the limit fail with EFBIG (Python ignores SIGXFSZ). At each limit the run stops
with one line naming the file and the cause (exit 2), leaves no temporary file, keeps what it
had (the checkpoint is whole or absent), and starting it again gives the uninterrupted run's
result."""
import json
import resource

import pytest
import torch
from fault_helpers import TINY, one_line_error, popen, temporaries
from fault_helpers import data_cache  # noqa: F401 (the suite's autouse fixture)

from gradops.cli import main
from gradops.train.engine.checkpoint import load_checkpoint


def _limit(n: int):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.RLIM_INFINITY))
    return set_limit


def _strip(path):
    return [{k: v for k, v in json.loads(ln).items() if k != "time_s"}
            for ln in path.read_text().splitlines()]


def test_file_size_limits_at_several_offsets(tmp_path, capsys):
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref)] + TINY) == 0
    size = (ref / "checkpoint.pt").stat().st_size
    # the lock's PID, the manifest, config.toml, the first checkpoint's middle and its checksum
    # record (the last bytes)
    limits = {"lock": 3, "manifest": 40, "config": 300, "ckpt-middle": size // 2,
              "ckpt-end": size - 40}
    runs = {k: tmp_path / k for k in limits}
    procs = {k: popen(["train", "--out", str(runs[k])] + TINY, preexec_fn=_limit(n))
             for k, n in limits.items()}
    lines = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=400)
        assert p.returncode == 2, (k, err[-3000:])
        lines[k] = line = one_line_error(err, "EFBIG", "ulimit")
        assert str(runs[k]) in line, (k, line)
        if runs[k].exists():
            assert temporaries(runs[k]) == [], k
            if (runs[k] / "checkpoint.pt").exists():
                load_checkpoint(runs[k])                   # whole, never a torn file
    assert not runs["lock"].exists()                       # refused before writing: nothing
    assert ".gradops.lock" in lines["lock"] and "config.toml" in lines["config"]
    assert ".gradops-manifest.json" in lines["manifest"] and not runs["manifest"].exists()
    assert "checkpoint.pt" in lines["ckpt-middle"] and "checkpoint.pt" in lines["ckpt-end"]
    capsys.readouterr()
    for k, d in runs.items():                              # the way back, then the same result
        again = ["--resume", str(d), "--no-progress"] if (d / "checkpoint.pt").exists() else \
            ["--out", str(d), "--overwrite"] + TINY
        assert main(["train"] + again) == 0, (k, capsys.readouterr().err)
        assert _strip(d / "metrics.jsonl") == _strip(ref / "metrics.jsonl"), k
        a = torch.load(d / "checkpoint.pt", weights_only=False)["trainer"]["model"]
        b = torch.load(ref / "checkpoint.pt", weights_only=False)["trainer"]["model"]
        assert all(torch.equal(a[n], b[n]) for n in b), k
        assert temporaries(d) == [], k


def test_an_unwritable_data_cache_warns_once_and_trains_from_memory(tmp_path, capsys,
                                                                      monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    monkeypatch.setenv("GRADOPS_DATA_CACHE", str(blocker / "cache"))
    from gradops.train.data import cache
    monkeypatch.setattr(cache, "_warned", set())
    assert main(["train", "--out", str(tmp_path / "run")] + TINY) == 0
    assert main(["train", "--out", str(tmp_path / "run2")] + TINY) == 0
    err = capsys.readouterr().err
    assert err.count("cannot write the data cache") == 1, err
    assert str(blocker / "cache") in err and "Traceback" not in err


@pytest.mark.parametrize("limit", [0, 20])
def test_a_full_disk_leaves_no_temporary_file(tmp_path, limit, monkeypatch):
    """The atomic writer itself, in process: a write that fails removes its temporary file and
    names the target; the old file stays whole."""
    import errno

    from gradops.train.config import atomic
    target = tmp_path / "f.txt"
    target.write_text("old\n")
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:limit])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(atomic, "open", lambda p, m: Full(real_open(p, m)), raising=False)
    with pytest.raises(OSError) as e:
        atomic.atomic_write_text(target, "new " * 100)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert target.read_text() == "old\n" and temporaries(tmp_path) == []
