"""MTLOptimizer's memory on the J path (every shared parameter through the per-task buffer
``J``): one step holds at most ``J`` plus one combined row beyond what ``T`` plain backward
passes hold, measured as the benchmark measures it (peak resident set of a fresh subprocess per
contender, glibc's mmap threshold fixed so that the resident set follows the live tensors)."""
import sys

import pytest

from gradops.bench.mtl_memory import run_contender

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/status (Linux)")

T, WIDTH, DEPTH = 4, 768, 2          # J = 4 x 1.18M x 4 B = 18.9 MB, one row 4.7 MB


KW = dict(T=T, width=WIDTH, depth=DEPTH, steps=2)


@pytest.fixture(scope="module")
def floor():
    return run_contender("floor", "ew", **KW)


@pytest.mark.parametrize("method", ["pcgrad", "graddrop"])
def test_j_path_holds_at_most_J_plus_one_row_beyond_the_floor(method, floor):
    ours = run_contender("gradops", method, linear_gram="off", **KW)
    J, row = ours["J"], ours["J"] / T
    extra = ours["peak"] - floor["peak"]
    # J is seen (less the floor's own .grad and backward temporaries, which the J path's peak
    # after the passes overlaps), and never more than J plus one row
    assert 0.5 * J <= extra <= J + row, (extra / J, floor, ours)
    assert ours["held"] - floor["held"] <= J + row                # between steps: J (+ g)
