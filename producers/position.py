"""Which stream positions have been delivered, and how that state is written down.

Batches are acknowledged out of stream order (several partitions, and with the user
partitioner a batch holds positions scattered over a stretch of the stream), so a single
"next position" would either repeat or skip examples on restart. The state is therefore a
*watermark* W (every position below W is delivered) plus a bitmap of the positions at or
above W that are delivered too. The bitmap spans only what is in flight or buffered, so it stays
small; it is stored zlib-compressed.

The truth is the record the producer commits in each transaction with the batches it covers
(``producers.recovery``); the position file is a cache of the last committed record, written
atomically (temporary file, fsync, rename), used only where the topic holds no record yet.
"""

from __future__ import annotations

import base64
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.core.exceptions import ConfigError

FORMAT_VERSION = 1


class Delivered:
    """The set of delivered stream positions: a watermark and a bitmap above it."""

    def __init__(self, watermark: int = 0, above: np.ndarray | None = None):
        self._base = watermark  # position of _bits[0]
        self._bits = np.zeros(1024, dtype=bool)
        self._lo = 0  # _bits[:_lo] are all True and already counted in the watermark
        self._hi = 0  # _bits[_hi:] are all False
        if above is not None and above.size:
            self.add(watermark + np.flatnonzero(above))

    @property
    def watermark(self) -> int:
        return self._base + self._lo

    def above(self) -> np.ndarray:
        """Bitmap of the positions watermark, watermark + 1, ... up to the last delivered one."""
        return self._bits[self._lo : self._hi].copy()

    def add(self, positions: np.ndarray) -> None:
        if positions.size == 0:
            return
        idx = positions - self._base
        if idx.min() < self._lo:
            raise ValueError(f"position {int(positions.min())} was already delivered")
        top = int(idx.max()) + 1
        if top > self._bits.size:
            # Drop the prefix that is behind the watermark before growing.
            keep = self._bits[self._lo : self._hi]
            size = max(1024, 2 * max(top - self._lo, keep.size))
            bits = np.zeros(size, dtype=bool)
            bits[: keep.size] = keep
            self._base += self._lo
            idx = idx - self._lo
            self._hi -= self._lo
            self._lo = 0
            top = int(idx.max()) + 1
            self._bits = bits
        self._bits[idx] = True
        self._hi = max(self._hi, top)
        if self._bits[self._lo]:
            # Advance over the run of delivered positions; argmin finds the first gap.
            window = self._bits[self._lo : self._hi]
            gap = int(np.argmin(window)) if not window.all() else window.size
            self._lo += gap

    def copy(self) -> Delivered:
        return Delivered(self.watermark, self.above())

    def add_new(self, positions: np.ndarray) -> None:
        """``add`` of the positions not delivered yet (recovery may see a position twice)."""
        self.add(positions[~self.contains(positions)])

    def contains(self, positions: np.ndarray) -> np.ndarray:
        idx = positions - self._base
        inside = (idx >= 0) & (idx < self._hi)
        out = idx < self._lo
        out[inside] |= self._bits[idx[inside]]
        return out


@dataclass
class Position:
    """What a restart needs: the delivered set, the next batch sequence number, counts, and
    where recovery reads the examples topic on from (per partition, the offset after this
    producer's last batch that the state covers)."""

    source: str
    producer_id: str
    delivered: Delivered = field(default_factory=Delivered)
    next_seq: int = 0
    examples: int = 0  # examples delivered over all runs
    batches: int = 0
    offsets: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        above = self.delivered.above()
        return {
            "version": FORMAT_VERSION,
            "source": self.source,
            "producer_id": self.producer_id,
            "watermark": self.delivered.watermark,
            "above_len": int(above.size),
            "above": base64.b64encode(zlib.compress(np.packbits(above).tobytes())).decode(),
            "next_seq": self.next_seq,
            "examples": self.examples,
            "batches": self.batches,
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "written_at": time.time(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str, hint: str = "") -> Position:
        try:
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {data.get('version')!r}, expected {FORMAT_VERSION}")
            n = int(data["above_len"])
            packed = np.frombuffer(zlib.decompress(base64.b64decode(data["above"])), dtype=np.uint8)
            above = np.unpackbits(packed, count=n).astype(bool) if n else np.zeros(0, dtype=bool)
            return cls(
                source=str(data["source"]),
                producer_id=str(data["producer_id"]),
                delivered=Delivered(int(data["watermark"]), above),
                next_seq=int(data["next_seq"]),
                examples=int(data["examples"]),
                batches=int(data["batches"]),
                # Files written before the positions topic have no offsets: recovery reads from 0.
                offsets={int(p): int(o) for p, o in data.get("offsets", {}).items()},
            )
        except (KeyError, ValueError, TypeError, AttributeError, zlib.error) as exc:
            raise ConfigError(f"{where} is not readable ({exc}){hint}") from None


def load(path: Path, source: str, producer_id: str) -> Position:
    """The stored position, or a fresh one when the file does not exist yet."""
    if not path.exists():
        return Position(source=source, producer_id=producer_id)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"position file {path} is not valid JSON ({exc}); delete it to start over") from None
    hint = (
        "; delete it (a restart then resumes from the positions topic, or from the start) "
        "or point producer.position_file elsewhere"
    )
    pos = Position.from_json(data, f"position file {path}", hint)
    if pos.source != source:
        raise ConfigError(
            f"position file {path} belongs to the {pos.source!r} source, not {source!r}; "
            "use one position file per source (producer.position_file)"
        )
    pos.producer_id = producer_id
    return pos


def save(path: Path, pos: Position) -> None:
    """Atomically replace the file: a crash leaves the old or the new state, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(pos.to_json(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
