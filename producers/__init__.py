"""Producers: turn a source of events into ExampleBatch messages on the examples topic.

Sources (``synthetic``, ``movielens``, ``file``) yield column chunks in stream order;
``producers.service`` micro-batches them, picks partitions, rate-limits and delivers them.
"""

from distill.core.presets import load_config_for, preset_overrides
from producers.source import Chunk, Source
from producers.sources import SOURCES, make_source

__all__ = ["SOURCES", "Chunk", "Source", "load_config_for", "make_source", "preset_overrides"]
