"""Checkpoints verify themselves: a flipped byte in any tensor (or anywhere else in the file), a
truncated file, a checkpoint without its keys or of another model is a one-line error naming the
file that suggests --overwrite, and the run directory stays as it was."""
import io
import shutil
import struct
import zipfile

import pytest
import torch
from fault_helpers import TINY, one_line_error, snapshot
from fault_helpers import data_cache  # noqa: F401 (the suite's autouse fixture)

from gradops.cli import main
from gradops.train.engine.checkpoint import load_checkpoint, save_checkpoint
from gradops.train.config.errors import ConfigError


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("ck") / "run"
    assert main(["train", "--out", str(run)] + TINY) == 0
    return run


def _entries(data: bytes) -> dict[str, tuple[int, int]]:
    """Each zip entry's (offset of its data, size)."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:
                                                             info.header_offset + 30])
            out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


def _refused(run, *needles):
    with pytest.raises(ConfigError) as e:
        load_checkpoint(run)
    msg = str(e.value)
    for n in ("--resume", str(run / "checkpoint.pt"), *needles):
        assert n in msg, (n, msg)
    return msg


def test_a_flip_in_every_tensor_and_elsewhere_is_refused(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ck = run / "checkpoint.pt"
    good = ck.read_bytes()
    load_checkpoint(run)                                   # the intact file loads
    entries = _entries(good)
    tensors = [n for n in entries if "/data/" in n]
    assert len(tensors) >= 20                              # model, optimizer, RNG states
    where = [off + size // 2 for n, (off, size) in entries.items() if size]
    where += [0, 40, len(good) // 2, len(good) - 30, len(good) - 70, len(good) - 1]
    for at in where:                                       # every tensor, the pickle, headers,
        ck.write_bytes(_flip(good, at))                    # the central directory, the checksum
        _refused(run, "--overwrite")
    for n in (0, 10, len(good) // 3, len(good) - 1):
        ck.write_bytes(good[:n])
        _refused(run, "--overwrite")
    ck.write_bytes(good)
    assert load_checkpoint(run)["epoch"] == 2


def test_the_cli_refuses_a_flipped_checkpoint_and_changes_nothing(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ck = run / "checkpoint.pt"
    good = ck.read_bytes()
    off, size = _entries(good)["archive/data/0"]
    ck.write_bytes(_flip(good, off + size // 2))
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, "--resume", str(ck), "checksum", "--overwrite")
    assert snapshot(run) == before
    # the suggested way out: start it again, to the same result
    assert main(["train", "--out", str(run), "--overwrite"] + TINY) == 0
    a = torch.load(ck, weights_only=False)["trainer"]["model"]
    b = torch.load(finished / "checkpoint.pt", weights_only=False)["trainer"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_incomplete_or_foreign_checkpoints_are_refused(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ck = run / "checkpoint.pt"
    save_checkpoint(run, {"epoch": 1})                     # checksum right, keys missing
    _refused(run, "incomplete", "trainer")
    torch.save({"format": 1, "epoch": 1}, ck)              # saved without a checksum
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    one_line_error(err, "--resume", "incomplete", "--overwrite")
    assert "no checksum" in err                            # said, not silent
    assert snapshot(run) == before
    # a whole checkpoint of another model (width 8) in this run (width 4)
    other = tmp_path / "other"
    assert main(["train", "--out", str(other)] + TINY + ["--width", "8"]) == 0
    shutil.copy(other / "checkpoint.pt", ck)
    (run / "result.json").unlink()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    one_line_error(capsys.readouterr().err, "--resume", "does not fit this run", "--overwrite")
