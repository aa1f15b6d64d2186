"""Bad input to ``gradops train`` / ``compare``: a one-line error naming the option (and the valid
choices), exit status 2, and nothing already written lost or changed."""
import pytest
from train_helpers import SMALL

from gradops.cli import main


def _snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", "--method", "ew", "--epochs", "1", "--out", str(out)] + SMALL) == 0
    return out


def _error(capsys, argv, option, *words):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert option in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("argv, option, words", [
    (["--method", "pcgard"], "--method",
     ["'pcgard'", "ew, pcgrad, ", "pcgrad-layer", "famo", "stl"]),
    (["--data", "mnist"], "--data", ["digits, digits-attrs"]),
    (["--backbone", "resnet_nope"], "--backbone", ["cnn, mlp"]),
    (["--backbone", "test_convnext"], "--backbone", ["cannot take inputs"]),
    (["--sparse", "k=abc"], "--sparse", ["off, k=INT, fraction=FLOAT"]),
    (["--sparse", "fraction=1.5"], "--sparse", ["fraction=FLOAT"]),
    (["--sparse", "top=3"], "--sparse", ["off, k=INT"]),
    (["--optim", "lamb"], "--optim", ["adam, adamw, sgd"]),
    (["--amp", "fp8"], "--amp", ["off, bf16, fp16"]),
    (["--weights", "/nonexistent/enc.pt"], "--weights", ["no such file"]),
    (["--epochs", "0"], "--epochs", [">= 1"]),
])
def test_bad_option(tmp_path, capsys, argv, option, words):
    out = tmp_path / "new"
    _error(capsys, ["train", "--out", str(out)] + argv + SMALL, option, *words)
    assert not out.exists()


def test_unknown_config_key(tmp_path, capsys):
    conf = tmp_path / "c.toml"
    conf.write_text('method = "ew"\nlearning_rate = 0.1\n')
    _error(capsys, ["train", "--config", str(conf), "--out", str(tmp_path / "r")],
           "--config", "'learning_rate'", "lr")
    conf.write_text('method = "ew\n')
    _error(capsys, ["train", "--config", str(conf), "--out", str(tmp_path / "r")],
           "--config", "not valid TOML")
    _error(capsys, ["compare", "--config", str(tmp_path / "missing.toml"),
                    "--out", str(tmp_path / "c")], "--config", "no such file")


def test_out_holding_another_run_is_left_alone(finished_run, capsys):
    before = _snapshot(finished_run)
    _error(capsys, ["train", "--method", "pcgrad", "--out", str(finished_run)] + SMALL,
           "--out", "--resume", "--overwrite")
    # a bad option with --overwrite is refused before anything is removed
    _error(capsys, ["train", "--method", "nope", "--overwrite", "--out", str(finished_run)]
           + SMALL, "--method")
    assert _snapshot(finished_run) == before


def test_compare_out_holding_another_comparison(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "report.md").write_text("an older report\n")
    _error(capsys, ["compare", "--budget", "quick", "--out", str(out), "--no-progress"],
           "--out", "--resume", "--overwrite")
    _error(capsys, ["compare", "--methods", "ew,bogus", "--out", str(tmp_path / "c2")],
           "--methods", "'bogus'", "ew, pcgrad")
    _error(capsys, ["compare", "--sparse", "off,k=", "--out", str(tmp_path / "c2")],
           "--sparse", "fraction=FLOAT")
    _error(capsys, ["compare", "--seeds", "0,x", "--out", str(tmp_path / "c2")], "--seeds")
    assert (out / "report.md").read_text() == "an older report\n"
    assert not (tmp_path / "c2").exists()


def test_corrupt_checkpoint(finished_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    ck = run / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[: len(ck.read_bytes()) // 3])
    before = _snapshot(run)
    _error(capsys, ["train", "--resume", str(run), "--no-progress"], "--resume",
           "corrupt", "checkpoint.pt")
    assert _snapshot(run) == before
    _error(capsys, ["train", "--resume", str(tmp_path / "nothing")], "--resume", "no run")


def test_resume_refuses_a_different_configuration(finished_run, capsys):
    before = _snapshot(finished_run)
    _error(capsys, ["train", "--resume", str(finished_run), "--lr", "0.5"], "--lr",
           "differs")
    assert _snapshot(finished_run) == before
