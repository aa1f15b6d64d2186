"""Selective task-group updates: the tracked affinity and the groups on a constructed 3-task
problem (two tasks share a target, one opposes), the attribution of each loss change to the
group that stepped, and the bookkeeping (history, state, errors)."""
import pytest
import torch

from gradops.train.engine.selective import SelectiveGroups, selective_step
from gradops.train.runs.extra_files import write_selective_outputs


def _driver(losses_of, params, lr):
    opt = torch.optim.SGD(params, lr=lr)

    def forward():
        ls = losses_of()
        return ls, None

    def update(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    def measure():
        with torch.no_grad():
            return losses_of()

    return forward, update, measure


def test_shared_target_tasks_group_and_the_opposing_one_stays_apart():
    torch.manual_seed(0)
    a = torch.randn(8)
    theta = torch.nn.Parameter(0.3 * torch.randn(8))
    targets = [a, a, -a]

    def losses_of():
        return [((theta - c) ** 2).sum() + 1.0 for c in targets]

    sel = SelectiveGroups(3, decay=0.1, warmup=5)
    f, u, m = _driver(losses_of, [theta], lr=0.05)
    for _ in range(5):
        selective_step(sel, f, u, m)
    A = sel.affinity
    assert A[0, 1] > 0 and A[1, 0] > 0            # a step towards a helps the other a-task
    assert A[0, 2] < 0 and A[1, 2] < 0 and A[2, 0] < 0 and A[2, 1] < 0
    assert sel.groups == [(0, 1), (2,)]
    assert sel.history == [[(0,), (1,), (2,)]] * 5
    for _ in range(10):
        selective_step(sel, f, u, m)
    assert sel.groups == [(0, 1), (2,)]
    assert sel.history[-1] == [(0, 1), (2,)]
    assert sel.affinity[0, 1] > 0 and sel.affinity[0, 2] < 0   # intra-group: both losses fell
    assert sel.ap_failures == 0


@pytest.mark.parametrize("order", [[(0,), (1,), (2,)], [(2,), (0,), (1,)], [(1, 2), (0,)]])
def test_each_loss_change_is_credited_to_the_group_that_stepped(order):
    # independent parameters: a group's step changes only its own tasks' losses
    thetas = [torch.nn.Parameter(torch.tensor([2.0 + t])) for t in range(3)]

    def losses_of():
        return [((th - 0.5) ** 2).sum() for th in thetas]

    sel = SelectiveGroups(3, decay=0.5, warmup=100)
    sel.groups = list(order)
    f, u, m = _driver(losses_of, thetas, lr=0.1)
    for _ in range(3):
        before = torch.stack(losses_of()).detach()
        first, _ = selective_step(sel, f, u, m)
        torch.testing.assert_close(first, before)
        sel.groups = list(order)
    A = sel.affinity
    for g in order:
        for s in range(3):
            for t in range(3):
                inside = s in g and t in g
                if s in g and inside:
                    assert A[s, t] > 0, (s, t)              # own step lowered the own loss
                elif s in g:
                    assert A[s, t] == 0, (s, t)             # no credit to other groups' tasks


def test_record_matches_the_formula_and_validates():
    sel = SelectiveGroups(3, decay=0.25, warmup=0)
    before = torch.tensor([1.0, 2.0, 4.0])
    after = torch.tensor([0.5, 2.5, 3.0])              # r = 0.5, -0.25, 0.25
    sel.record([0, 1], before, after)
    A = sel.affinity
    torch.testing.assert_close(A[0], 0.25 * torch.tensor([0.25, -0.125, 0.125],
                                                         dtype=torch.float64))
    # intra pair (1, 0): task 1's loss rose -> negative; self term keeps its sign
    torch.testing.assert_close(A[1], 0.25 * torch.tensor([-0.25, -0.125, 0.125],
                                                         dtype=torch.float64))
    assert A[2].abs().sum() == 0
    with pytest.raises(ValueError, match="group"):
        sel.record([3], before, after)
    with pytest.raises(ValueError, match="decay"):
        SelectiveGroups(3, decay=0.0)
    sd = sel.state_dict()
    other = SelectiveGroups(3, decay=0.25, warmup=0)
    other.load_state_dict(sd)
    assert torch.equal(other.affinity, sel.affinity) and other.groups == sel.groups


def test_outputs_are_written(tmp_path):
    sel = SelectiveGroups(2, decay=0.5, warmup=1)
    sel.record([0], torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.9]))
    sel.record([1], torch.tensor([1.0, 1.0]), torch.tensor([0.9, 0.5]))
    sel.end_step()
    write_selective_outputs(sel, ["x", "y"], tmp_path)
    lines = (tmp_path / "selective_groups.csv").read_text().splitlines()
    assert lines == ["step,n_groups,groups", "1,2,x|y"]
    assert sel.groups == [(0, 1)]
    assert (tmp_path / "selective_affinity.png").stat().st_size > 0
    assert (tmp_path / "selective_groups.png").stat().st_size > 0


def test_train_selective_with_sparse_training(tmp_path):
    from train_helpers import SMALL

    from gradops.cli import main
    out = tmp_path / "run"
    rc = main(["train", "--data", "digits", "--method", "selective", "--selective-warmup", "2",
               "--selective-decay", "0.1", "--sparse", "k=5", "--epochs", "1", "--out",
               str(out)] + SMALL)
    assert rc == 0
    lines = (out / "selective_groups.csv").read_text().splitlines()
    assert len(lines) == 1 + 128 // 32
    assert lines[1] == "1,3,left|right|sum" and lines[2] == "2,3,left|right|sum"
    for f in ("selective_affinity.csv", "selective_affinity.png", "selective_groups.png"):
        assert (out / f).stat().st_size > 0
    assert main(["train", "--method", "selective", "--selective-decay", "0", "--out",
                 str(tmp_path / "x")] + SMALL) == 2
