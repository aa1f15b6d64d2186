"""Read-only directories: ``--out`` on a read-only file system, ``--resume`` of a run there and a
read-only data cache give one line naming the path and the cause (exit 2), or, for the cache, a
warning and training from memory.

Permissions do not stop root, so as root the directory is made read-only by a read-only bind
mount in a private mount namespace (``unshare --mount``; needs CAP_SYS_ADMIN or unprivileged
user namespaces). Where that is unavailable the test is skipped and says why; as another user,
``chmod 0555`` does it."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from fault_helpers import TINY, env, one_line_error, snapshot
from fault_helpers import data_cache  # noqa: F401 (the suite's autouse fixture)

from gradops.cli import main

DRIVER = r"""
import contextlib, io, json, sys
from gradops.cli import main
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            rc = main(argv)
        except BaseException as e:
            rc = repr(e)
    out[name] = [rc, err.getvalue()]
print(json.dumps(out))
"""


def _cases(ro, rw):
    return {"cache": ["train", "--out", str(rw / "cached-run")] + TINY,   # first: warns once
            "out": ["train", "--out", str(ro / "new-run")] + TINY,
            "resume": ["train", "--resume", str(ro / "run"), "--no-progress"],
            "compare": ["compare", "--out", str(ro / "cmp"), "--budget", "quick", "--methods",
                        "ew", "--no-progress"]}


def _ro_bind(ro: str) -> list[str] | None:
    """The command prefix that runs a command with ``ro`` mounted read-only, or None."""
    shell = ["mount --bind {0} {0} && mount -o remount,bind,ro {0} && exec \"$@\"".format(ro)]
    for pre in (["unshare", "--mount"], ["unshare", "--mount", "--map-root-user"]):
        if shutil.which(pre[0]) is None:
            return None
        probe = subprocess.run(pre + ["sh", "-c", shell[0], "sh", "true"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return pre + ["sh", "-c", shell[0], "sh"]
    return None


def test_read_only_directories(tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    assert main(["train", "--out", str(ro / "run")] + TINY[:-2] + ["--epochs", "1"]) == 0
    (ro / "run" / "result.json").unlink()    # resumable: one more epoch to train
    cfg = (ro / "run" / "config.toml").read_text().replace("epochs = 1", "epochs = 2")
    (ro / "run" / "config.toml").write_text(cfg)
    (ro / "cache").mkdir()
    before = snapshot(ro)
    e = env()
    e["GRADOPS_DATA_CACHE"] = str(ro / "cache")
    if os.geteuid() == 0:
        prefix = _ro_bind(str(ro))
        if prefix is None:
            pytest.skip("running as root, where permissions do not make a directory read-only, "
                        "and no read-only bind mount is possible here (unshare --mount needs "
                        "CAP_SYS_ADMIN or unprivileged user namespaces)")
    else:
        prefix = []
        for p in [ro, *ro.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
    try:
        r = subprocess.run(prefix + [sys.executable, "-c", DRIVER,
                                     json.dumps(_cases(ro, rw))],
                           capture_output=True, text=True, env=e, timeout=400)
    finally:
        for p in [ro, *ro.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    cause = "EROFS" if prefix else "EACCES"
    for k in ("out", "resume", "compare"):
        rc, err = res[k]
        assert rc == 2, (k, err[-3000:])
        line = one_line_error(err, cause)
        assert str(ro) in line, (k, line)
    rc, err = res["cache"]                 # the cache is an optimisation: a warning, then trains
    assert rc == 0 and "cannot write the data cache" in err and cause in err, err[-3000:]
    assert (rw / "cached-run" / "result.json").is_file()
    assert snapshot(ro) == before          # nothing written, nothing lost
