"""The window rule itself: SEMANTICS.md's worked examples, and mask.py against the
independent brute force of reference.py."""

import itertools

import numpy as np
import pytest

from jax_gna import mask, reference
from jax_gna.params import Axis

# SEMANTICS.md, "Worked examples" (L = 10): (k, s, d, causal) -> inclusive windows.
WORKED = {
    (3, 1, 1, False): [(0, 2), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 8), (7, 9),
                       (7, 9)],
    (4, 1, 1, False): [(0, 3), (0, 3), (0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8), (6, 9),
                       (6, 9)],
    (4, 2, 1, False): [(0, 3), (0, 3), (1, 4), (1, 4), (3, 6), (3, 6), (5, 8), (5, 8), (6, 9),
                       (6, 9)],
    (4, 2, 1, True): [(0, 0), (0, 1), (0, 2), (0, 3), (2, 4), (2, 5), (4, 6), (4, 7), (6, 8),
                      (6, 9)],
}


@pytest.mark.parametrize("params", sorted(WORKED))
def test_worked_examples(params):
    k, s, d, causal = params
    expected = [list(range(a, b + 1)) for a, b in WORKED[params]]
    assert reference.axis_windows(10, k, s, d, causal) == expected
    ax = Axis(10, k, s, d, causal)
    lo, hi = mask.window(np.arange(10), ax)
    assert list(zip(lo.tolist(), hi.tolist())) == WORKED[params]


def test_worked_example_dilation():
    assert reference.axis_windows(10, 3, 1, 3, False)[9] == [3, 6, 9]
    got = np.nonzero(mask.is_neighbor(9, np.arange(10), Axis(10, 3, 1, 3, False)))[0]
    assert got.tolist() == [3, 6, 9]


AXIS_CASES = [(L, k, s, d, c)
              for L in (2, 3, 7, 10, 16, 23)
              for k in (2, 3, 4, 5, 8)
              for s in (1, 2, 3, k)
              for d in (1, 2, 3)
              for c in (False, True)
              if k * d <= L and s <= k]


@pytest.mark.parametrize("L,k,s,d,c", AXIS_CASES)
def test_mask_matches_reference(L, k, s, d, c):
    ax = Axis(L, k, s, d, c)
    i = np.arange(L)
    m = mask.is_neighbor(i[:, None], i[None, :], ax)
    ref = np.zeros((L, L), bool)
    for q, keys in enumerate(reference.axis_windows(L, k, s, d, c)):
        ref[q, keys] = True
    np.testing.assert_array_equal(m, ref)
    counts = ref.sum(axis=1)
    if not c:  # a non-causal query always sees exactly k keys
        assert (counts == k).all()
    else:  # a causal query sees itself, nothing after it, at most k keys
        assert (counts >= 1).all() and (counts <= k).all()
        assert not np.triu(ref, 1).any()
    first, last = mask.window_extent(i, ax)
    for q in range(L):
        keys = np.nonzero(ref[q])[0]
        assert first[q] == keys.min() and last[q] == keys.max()


@pytest.mark.parametrize("L,k,s,d,c", AXIS_CASES[::7])
@pytest.mark.parametrize("tile", [1, 3, 4, 8])
def test_spans_cover_every_window(L, k, s, d, c, tile):
    """key_spans/query_spans: every neighbor pair lies inside its tile's span."""
    ax = Axis(L, k, s, d, c)
    i = np.arange(L)
    m = mask.is_neighbor(i[:, None], i[None, :], ax)
    width, starts = mask.key_spans(ax, 0, L, tile, 0, L)
    assert 1 <= width <= L and (starts >= 0).all() and (starts + width <= L).all()
    for q, j in zip(*np.nonzero(m)):
        assert starts[q // tile] <= j < starts[q // tile] + width
    width, starts = mask.query_spans(ax, 0, L, tile, 0, L)
    assert 1 <= width <= L and (starts >= 0).all() and (starts + width <= L).all()
    for q, j in zip(*np.nonzero(m)):
        assert starts[j // tile] <= q < starts[j // tile] + width


def test_spans_of_a_block():
    """A block of queries inside a larger key block (the sharded case)."""
    ax = Axis(40, 5, 2, 2, False)
    width, starts = mask.key_spans(ax, 12, 8, 4, 4, 28)
    i = np.arange(12, 20)
    first, last = mask.window_extent(i, ax)
    for n, q in enumerate(i):
        assert starts[n // 4] <= first[n] and last[n] < starts[n // 4] + width
    with pytest.raises(ValueError, match="key block"):
        mask.key_spans(ax, 12, 8, 4, 12, 8)


def test_neighbor_mask_is_and_over_axes():
    shape, k, s, d, c = (5, 6), (3, 4), (1, 2), (1, 1), (False, True)
    m = reference.neighbor_mask(shape, k, s, d, c)
    w0 = reference.axis_windows(5, 3, 1, 1, False)
    w1 = reference.axis_windows(6, 4, 2, 1, True)
    for (a0, a1), (b0, b1) in itertools.product(itertools.product(range(5), range(6)),
                                                repeat=2):
        assert m[a0 * 6 + a1, b0 * 6 + b1] == (b0 in w0[a0] and b1 in w1[a1])
