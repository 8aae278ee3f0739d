"""`python -m bench NAME ...` picks the modules to run."""

from bench.__main__ import discover


def test_a_module_name_picks_that_module_only():
    assert discover(["teacher"]) == ["bench_teacher"]  # not bench_teacher_pool too
    assert discover(["bench_teacher_pool"]) == ["bench_teacher_pool"]


def test_a_part_of_a_name_picks_every_module_it_is_in():
    assert discover(["pipe", "codec"]) == ["bench_codec", "bench_pipeline"]
    assert {"bench_teacher", "bench_teacher_pool"} <= set(discover(["teach"]))


def test_no_selection_picks_every_bench_module():
    names = discover([])
    assert names == sorted(names) and all(n.startswith("bench_") for n in names) and "bench_student" in names
