"""Avro schemas of the wire format, parsed once, indexed by fingerprint.

Files are named ``<kind>.v<N>.avsc``; the highest version of a kind is the one written and the
one read into. Older versions stay so that readers can resolve messages written with them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

_NAME = re.compile(r"^(?P<kind>[a-z_]+)\.v(?P<version>\d+)\.avsc$")


@dataclass(frozen=True)
class Schema:
    kind: str
    version: int
    fingerprint: bytes  # CRC-64-AVRO of the parsing canonical form, 8 bytes (hex in headers)
    parsed: dict

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()


@lru_cache(maxsize=1)
def all_schemas() -> tuple[Schema, ...]:
    found = []
    for entry in resources.files(__package__).iterdir():
        match = _NAME.match(entry.name)
        if not match:
            continue
        raw = json.loads(entry.read_text())
        parsed = fastavro.parse_schema(raw)
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
        found.append(Schema(match["kind"], int(match["version"]), fp, parsed))
    return tuple(sorted(found, key=lambda s: (s.kind, s.version)))


def latest(kind: str) -> Schema:
    versions = [s for s in all_schemas() if s.kind == kind]
    if not versions:
        raise KeyError(f"no schema of kind {kind!r} in schemas/")
    return versions[-1]


@cache
def by_fingerprint() -> dict[bytes, Schema]:
    return {s.fingerprint: s for s in all_schemas()}
