"""runtime.tables: one markdown table, one missing-value convention, wrapped titles."""

import pytest

from gprebn_edge.runtime import tables


def test_missing_values_share_one_convention():
    assert tables.MISSING == "n/a"
    for f in (tables.fmt_pct, tables.fmt_num, tables.fmt_ms, tables.fmt_ratio):
        assert f(None) == "n/a"
    assert tables.fmt_pct(0.12345) == "12.35 %" and tables.fmt_pct(0.12345, 1) == "12.3 %"
    assert tables.fmt_num(0.123456) == "0.1235" and tables.fmt_ms(1.23456) == "1.235"
    assert tables.fmt_ratio(1.23456) == "1.235x" and tables.fmt_ratio(1.2, 2) == "1.20x"
    assert tables.fmt_num(float("nan")) == "n/a"


def test_md_table_escapes_and_aligns():
    lines = tables.md_table(["", "a|b", "c"], [["row", 1.5, None], ["x|y", "1 %", 2]])
    assert lines == ["| | a\\|b | c |", "|---|---:|---:|", "| row | 1.5 | n/a |", "| x\\|y | 1 % | 2 |"]
    assert tables.md_table(["k", "v"], [["a", "b"]], align="ll")[1] == "|---|---|"
    with pytest.raises(ValueError, match="3 cells"):
        tables.md_table(["a", "b"], [["1", "2", "3"]])


def test_wrap_title_never_cuts():
    long = "a-model-with-a-very-long-name.onnx vs another-model-with-an-even-longer-name.onnx: 2000 images"
    wrapped = tables.wrap_title(long, width=50)
    assert wrapped.count("\n") >= 1 and all(len(line) <= 50 for line in wrapped.split("\n"))
    assert wrapped.replace("\n", " ") == long
    assert tables.wrap_title("one\ntwo", width=40) == "one\ntwo"  # explicit breaks are kept
    word = "x" * 70
    assert tables.wrap_title(word, width=40).replace("\n", "") == word  # an overlong word is broken, not dropped
