"""The demo's task data: operand lengths fixed or drawn from a range, distinct rows, clear errors."""

import json
from collections import Counter

import pytest

from envs.tasks import arithmetic


def lengths(row):
    return len(str(row["a"])), len(str(row["b"]))


def test_fixed_lengths_and_distinct_rows():
    rows = arithmetic.make_rows(300, seed=0)  # the default: 3-digit x 2-digit
    assert {lengths(r) for r in rows} == {(3, 2)}
    assert len({(r["a"], r["b"]) for r in rows}) == 300
    assert all(r["answer"] == str(r["a"] * r["b"]) and r["question"] == f"What is {r['a']} * {r['b']}?" for r in rows)


def test_lengths_from_a_range_are_drawn_uniformly():
    rows = arithmetic.make_rows(1600, seed=0, a_digits=(1, 4), b_digits=(2, 3))
    counts = Counter(lengths(r) for r in rows)
    assert set(counts) == {(la, lb) for la in range(1, 5) for lb in (2, 3)}
    # 8 length pairs, 200 rows each on average; 1-digit a has only 9 x 990 problems, plenty
    assert all(120 < c < 280 for c in counts.values()), counts


def test_write_splits_are_disjoint_and_unseen_lengths_stay_out(tmp_path):
    train, test = arithmetic.write_splits(tmp_path, n_train=50, n_test=10, seed=3, a_digits=(1, 2), b_digits=1)
    rows = [json.loads(line) for path in (train, test) for line in path.read_text().splitlines()]
    assert len(rows) == 60 and len({r["question"] for r in rows}) == 60
    assert all(lengths(r)[0] in (1, 2) and lengths(r)[1] == 1 for r in rows)


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="operand length"):
        arithmetic.make_rows(5, seed=0, a_digits=(3, 2))
    with pytest.raises(ValueError, match="operand length"):
        arithmetic.make_rows(5, seed=0, a_digits=0)
    with pytest.raises(ValueError, match="only 81 exist"):
        arithmetic.make_rows(60, seed=0, a_digits=1, b_digits=1)
