"""Benchmarks that print ratios: ``python -m bench`` (or ``make bench``).

Each ``bench/bench_<topic>.py`` module has a ``run() -> list[dict]`` function. A row is a dict
with ``name``, ``value`` and ``unit``, and optionally ``ratio`` (value divided by a baseline
measured in the same run, side by side, so that the machine's speed cancels out) and ``vs``
(what that baseline is). Absolute numbers vary between machines; the ratios are what to read.
Keep each module under about 20 seconds.
"""
