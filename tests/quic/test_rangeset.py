from hypothesis import given, strategies as st

from mqvpn.quic.rangeset import RangeSet


def test_in_order_and_merge():
    r = RangeSet()
    for pn in range(5):
        r.add(pn)
    assert list(r) == [(0, 5)]
    r.add(7)
    r.add(9, 12)
    assert list(r) == [(0, 5), (7, 8), (9, 12)]
    r.add(5, 9)
    assert list(r) == [(0, 12)]
    assert 11 in r and 12 not in r


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 20))), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 20))))
def test_matches_a_set(adds, subs):
    r = RangeSet()
    model: set[int] = set()
    for start, n in adds:
        r.add(start, start + n)
        model.update(range(start, start + n))
    for start, n in subs:
        r.subtract(start, start + n)
        model.difference_update(range(start, start + n))
    flat = [v for s, e in r for v in range(s, e)]
    assert flat == sorted(model)
    ranges = list(r)
    for (s1, e1), (s2, e2) in zip(ranges, ranges[1:]):
        assert e1 < s2  # disjoint and not adjacent
    for v in range(0, 230):
        assert (v in r) == (v in model)
