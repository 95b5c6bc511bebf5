"""scripts/count_assertions.py counts what a test asserts from its syntax tree (issue 28's "nothing asserted less")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("count_assertions", REPO / "scripts" / "count_assertions.py")
counter = importlib.util.module_from_spec(spec)
spec.loader.exec_module(counter)

SOURCE = """
import pytest

def test_a():
    assert 1 == 1
    assert 2 == pytest.approx(2.0)
    with pytest.raises(ValueError, match="x"):
        int("x")
    other.raises(KeyError)  # not pytest's: not counted

def helper():
    with pytest.warns(UserWarning):
        pass
    for _ in range(3):
        assert True  # counted once: the count is of statements, not of executions
"""


def test_counts_asserts_and_pytest_checks_of_a_known_source():
    assert counter.count_source(SOURCE) == {"assert": 3, "raises": 1, "warns": 1}


def test_counts_a_tree_per_file(tmp_path, capsys):
    (tmp_path / "test_one.py").write_text(SOURCE)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "test_two.py").write_text("def test_b():\n    assert 0 < 1\n")
    per_file = counter.count_tree(tmp_path)
    assert per_file == {
        "sub/test_two.py": {"assert": 1, "raises": 0, "warns": 0},
        "test_one.py": counter.count_source(SOURCE),
    }
    assert counter.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].split()[0] == "6"
