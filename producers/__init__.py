"""Producers: turn a source of events into ExampleBatch messages on the examples topic.

Sources (``synthetic``, ``movielens``, ``file``) yield column chunks in stream order;
``producers.service`` paces them, and ``producers.events`` reads a topic of events instead.
Both batch by partition (``producers.batcher``), deliver through ``producers.delivery`` (in
transactions: ``producers.transaction``) and run as a process through ``producers.running``.
"""

from distill.core.presets import load_config_for, preset_overrides
from producers.source import Chunk, Source
from producers.sources import SOURCES, make_source

__all__ = ["SOURCES", "Chunk", "Source", "load_config_for", "make_source", "preset_overrides"]
