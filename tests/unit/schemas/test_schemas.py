"""The .avsc files and their loader: parsed once, one fingerprint each, newest version wins."""

from __future__ import annotations

import json
from importlib import resources

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form

import schemas

KINDS = {"example_batch", "label_batch", "dead_letter", "checkpoint_announcement"}


def avsc_files() -> list[str]:
    return sorted(e.name for e in resources.files("schemas").iterdir() if e.name.endswith(".avsc"))


def test_every_avsc_file_is_loaded():
    loaded = {f"{s.kind}.v{s.version}.avsc" for s in schemas.all_schemas()}
    assert loaded == set(avsc_files())
    assert {s.kind for s in schemas.all_schemas()} == KINDS


def test_parsed_once():
    assert schemas.all_schemas() is schemas.all_schemas()
    assert schemas.by_fingerprint() is schemas.by_fingerprint()
    assert schemas.latest("example_batch") is schemas.latest("example_batch")


def test_sorted_by_kind_then_version():
    found = [(s.kind, s.version) for s in schemas.all_schemas()]
    assert found == sorted(found)
    assert len(set(found)) == len(found)


def test_fingerprints_are_unique_and_indexed():
    prints = [s.fingerprint for s in schemas.all_schemas()]
    assert len(set(prints)) == len(prints)
    assert all(len(fp) == 8 for fp in prints)
    index = schemas.by_fingerprint()
    assert set(index) == set(prints)
    for s in schemas.all_schemas():
        assert index[s.fingerprint] is s
        assert bytes.fromhex(s.fingerprint_hex) == s.fingerprint


@pytest.mark.parametrize("name", avsc_files())
def test_fingerprint_is_crc64_of_canonical_form(name):
    raw = json.loads(resources.files("schemas").joinpath(name).read_text())
    canonical = to_parsing_canonical_form(fastavro.parse_schema(raw))
    expected = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    kind, version = name.split(".v")[0], int(name.split(".v")[1].split(".")[0])
    s = next(s for s in schemas.all_schemas() if (s.kind, s.version) == (kind, version))
    assert s.fingerprint == expected


def test_latest_versions():
    assert schemas.latest("example_batch").version == 2
    assert schemas.latest("label_batch").version == 1
    assert schemas.latest("dead_letter").version == 1
    for kind in KINDS:
        versions = [s.version for s in schemas.all_schemas() if s.kind == kind]
        assert schemas.latest(kind).version == max(versions)


def test_latest_example_batch_has_optional_truth():
    fields = {f["name"]: f for f in schemas.latest("example_batch").parsed["fields"]}
    assert fields["truth"]["type"] == ["null", "bytes"]
    assert fields["truth"]["default"] is None


def test_newer_versions_only_add_fields_with_defaults():
    """Backward compatibility: a reader of version N reads every older version's messages."""
    for kind in KINDS:
        versions = [s for s in schemas.all_schemas() if s.kind == kind]
        for old, new in zip(versions, versions[1:], strict=False):
            old_fields = {f["name"] for f in old.parsed["fields"]}
            for f in new.parsed["fields"]:
                if f["name"] not in old_fields:
                    where = f"{kind} v{new.version}: new field {f['name']!r}"
                    assert "default" in f, f"{where} needs a default"


def test_unknown_kind_names_the_folder():
    with pytest.raises(KeyError, match="no schema of kind 'nope'"):
        schemas.latest("nope")
