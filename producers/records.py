"""One event record in, one example row out: decoding (JSON, or Avro in the Schema Registry
wire format) and the ``[events]`` column mapping, with the file source's value rules.

The mapping is the file source's (``ColumnMapping``), applied to one record at a time so that a
bad event is refused alone (``DecodeError``, its reason goes to the DLQ):
- categorical fields: integers as they are; text that is an integer is that integer, other
  text is hashed like the file source's (``producers.file.text_id``);
- dense and label fields: numbers (booleans count as 0/1); a label must be finite, a dense
  value too unless ``wire.non_finite`` says otherwise;
- event time: epoch seconds (below 1e11) or ms, or ISO-8601 text; unmapped: the read time;
- example id: an integer field, or the event's place in the events topic when unmapped;
- user (the partitioning key): the mapped field as a categorical, or the example id.
A field name with dots reaches into nested records (``context.device``) unless the record has
a field of that exact name.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import numpy as np

from distill.core.config import EventsConfig, NonFinitePolicy
from distill.core.exceptions import BrokerError, ConfigError, DecodeError
from producers.file import SECONDS_BELOW, check_label_tasks, text_id
from producers.source import Chunk

OFFSET_BITS = 40  # an event's place: partition << 40 | offset (a trillion offsets per partition)
_MISSING = object()
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Decoder = Callable[[bytes | None], dict[str, Any]]


def place(partition: int, offset: int) -> int:
    return (partition << OFFSET_BITS) | offset


def json_decoder() -> Decoder:
    def decode(value: bytes | None) -> dict[str, Any]:
        if not value:
            raise DecodeError("empty", "the event has no value")
        try:
            record = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError("undecodable", f"not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise DecodeError("undecodable", f"a JSON event must be an object, got {type(record).__name__}")
        return record

    return decode


def avro_decoder(cfg: EventsConfig) -> Decoder:
    """The Schema Registry wire format: magic byte 0, a 4-byte schema id, the Avro body. The
    writer schema is fetched from the registry by id (once, by confluent_kafka's client) and
    resolved to the reader schema by Avro's rules.

    A plain schema is read with fastavro directly (about 10x faster than confluent_kafka's
    AvroDeserializer, which spends most of its time per message looking for data-contract
    rules); a schema with rules (a ruleSet: field encryption, CEL transforms) or references
    goes through the AvroDeserializer, which applies them."""
    try:
        from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError
        from confluent_kafka.schema_registry.avro import AvroDeserializer
        from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError
    except ImportError as exc:
        raise ConfigError(
            f"events.format avro needs the Schema Registry client ({exc}); "
            "install it with: pip install 'confluent-kafka[schemaregistry]'"
        ) from None
    reg = cfg.schema_registry
    conf = _registry_conf(cfg)
    reader_text = None
    if reg.reader_schema is not None:
        path = Path(reg.reader_schema)
        if not path.is_file():
            raise ConfigError(f"events.schema_registry.reader_schema {path} does not exist; point it at an .avsc file")
        reader_text = path.read_text()
    try:
        reader = fastavro.parse_schema(json.loads(reader_text)) if reader_text else None
    except (ValueError, fastavro.schema.SchemaParseException) as exc:
        raise ConfigError(
            f"events.schema_registry.reader_schema {reg.reader_schema} is not an Avro schema: {exc}"
        ) from None
    client = SchemaRegistryClient(conf)
    deserializer = AvroDeserializer(client, schema_str=reader_text)
    context = SerializationContext(cfg.topic, MessageField.VALUE)
    writers: dict[int, Any] = {}  # schema id -> parsed writer schema, or None: use the deserializer

    def writer(schema_id: int) -> Any:
        if schema_id not in writers:
            schema = client.get_schema(schema_id)
            plain = not schema.references and not (
                schema.rule_set
                and (schema.rule_set.domain_rules or schema.rule_set.migration_rules or schema.rule_set.encoding_rules)
            )
            writers[schema_id] = fastavro.parse_schema(json.loads(schema.schema_str or "")) if plain else None
        return writers[schema_id]

    def decode(value: bytes | None) -> dict[str, Any]:
        if not value:
            raise DecodeError("empty", "the event has no value")
        if len(value) < 5 or value[0] != 0:
            raise DecodeError("undecodable", "not in the Schema Registry wire format (magic byte 0, 4-byte schema id)")
        schema_id = int.from_bytes(value[1:5], "big")
        try:
            parsed = writer(schema_id)
            if parsed is None:
                record = deserializer(value, context)
            else:
                body = io.BytesIO(value)
                body.seek(5)
                record = fastavro.schemaless_reader(body, parsed, reader)
                if body.tell() != len(value):
                    raise DecodeError("undecodable", f"{len(value) - body.tell()} bytes after the Avro record")
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                raise DecodeError("unknown_schema", f"schema id {schema_id} is not in the registry") from None
            raise  # the registry is unreachable or failing: not the event's fault
        except (DecodeError, ConfigError):
            raise
        except SerializationError as exc:
            raise DecodeError("undecodable", f"Avro: {exc}") from None
        except Exception as exc:  # fastavro raises several types for truncated or garbled bodies
            if type(exc).__module__.startswith(("httpx", "httpcore")):
                raise
            raise DecodeError("undecodable", f"Avro (schema id {schema_id}): {type(exc).__name__}: {exc}") from None
        if not isinstance(record, dict):
            raise DecodeError("undecodable", f"an Avro event must be a record, got {type(record).__name__}")
        return record

    return decode


def _registry_conf(cfg: EventsConfig) -> dict[str, Any]:
    reg = cfg.schema_registry
    conf: dict[str, Any] = {"url": reg.url}
    if reg.basic_auth_user_info:
        conf["basic.auth.user.info"] = reg.basic_auth_user_info
    if reg.ssl_ca_location:
        conf["ssl.ca.location"] = reg.ssl_ca_location
    return conf


def check_registry(cfg: EventsConfig) -> None:
    """At start-up: the registry answers (BrokerError while it does not, which is retried) and
    takes the credentials (ConfigError)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError

    url = cfg.schema_registry.url
    try:
        SchemaRegistryClient(_registry_conf(cfg)).get_subjects()
    except SchemaRegistryError as exc:
        if exc.http_status_code in (401, 403):
            raise ConfigError(
                f"the schema registry at {url} refused the credentials "
                f"(events.schema_registry.basic_auth_user_info): {exc.error_message}"
            ) from None
        raise BrokerError(
            f"the schema registry at {url} answered {exc.http_status_code}: {exc.error_message}"
        ) from None
    except Exception as exc:  # httpx's connection errors
        raise BrokerError(f"the schema registry at {url} (events.schema_registry.url) is unreachable: {exc}") from None


def make_decoder(cfg: EventsConfig) -> Decoder:
    return avro_decoder(cfg) if cfg.format == "avro" else json_decoder()


def _field(record: dict[str, Any], name: str) -> Any:
    if name in record:
        return record[name]
    node: Any = record
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


@dataclass
class Row:
    place: int
    event_time_ms: int
    example_id: int
    user: int
    categorical: list[int]
    dense: list[float]
    labels: list[float]


class Mapper:
    """The ``[events]`` mapping, checked against the configured tasks at start-up."""

    def __init__(self, cfg: EventsConfig, task_names: list[str], non_finite: NonFinitePolicy):
        check_label_tasks(cfg.labels, task_names, "events.labels", "field")
        self.cfg = cfg
        self.label_fields = [cfg.labels[n] for n in task_names]
        self.non_finite = non_finite

    def row(self, record: dict[str, Any], where: int) -> Row:
        cfg = self.cfg
        example_id = self._integer(record, cfg.example_id) if cfg.example_id else where
        categorical = [self._categorical(record, f) for f in cfg.categorical]
        return Row(
            place=where,
            event_time_ms=self._event_time(record, cfg.event_time) if cfg.event_time else int(time.time() * 1000),
            example_id=example_id,
            user=self._categorical(record, cfg.user) if cfg.user else example_id,
            categorical=categorical,
            dense=[self._number(record, f, self.non_finite, "dense") for f in cfg.dense],
            labels=[self._number(record, f, "reject", "label") for f in self.label_fields],
        )

    @staticmethod
    def _get(record: dict[str, Any], name: str) -> Any:
        value = _field(record, name)
        if value is _MISSING or value is None:
            raise DecodeError("missing_field", f"the event has no field {name!r}")
        return value

    def _integer(self, record: dict[str, Any], name: str) -> int:
        value = self._get(record, name)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise DecodeError("wrong_type", f"field {name!r} is {value!r}, expected an integer")
        if not INT64_MIN <= value <= INT64_MAX:
            raise DecodeError("wrong_type", f"field {name!r} is {value}, outside the 64-bit integers")
        return value

    def _categorical(self, record: dict[str, Any], name: str) -> int:
        value = self._get(record, name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int):  # bool included: 0/1
            # Beyond 64 bits an integer is an id all the same: hashed as its text.
            return int(value) if INT64_MIN <= value <= INT64_MAX else text_id(str(value))
        if isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                return text_id(value)
            return number if INT64_MIN <= number <= INT64_MAX else text_id(value)
        raise DecodeError("wrong_type", f"field {name!r} is {value!r}, expected an integer or text id")

    def _number(self, record: dict[str, Any], name: str, policy: NonFinitePolicy, what: str) -> float:
        value = self._get(record, name)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise DecodeError("wrong_type", f"{what} field {name!r} is {value!r}, expected a number") from None
        if not isinstance(value, (int, float)):
            raise DecodeError("wrong_type", f"{what} field {name!r} is {value!r}, expected a number")
        number = float(value)
        if not math.isfinite(number):
            if policy == "reject":
                raise DecodeError("non_finite", f"{what} field {name!r} is {number}")
            if policy == "zero":
                return 0.0
        return number

    def _event_time(self, record: dict[str, Any], name: str) -> int:
        value = self._get(record, name)
        if isinstance(value, bool):
            raise DecodeError("wrong_type", f"event-time field {name!r} is {value!r}")
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise DecodeError("non_finite", f"event-time field {name!r} is {value}")
            ms = round(value * 1000 if abs(value) < SECONDS_BELOW else value)
            if abs(ms) >= 2**62:
                raise DecodeError("wrong_type", f"event-time field {name!r} is {value}, not a time")
            return ms
        if isinstance(value, str):
            try:
                return int(np.datetime64(value.strip().rstrip("Z"), "ms").astype(np.int64))
            except ValueError:
                pass
        raise DecodeError(
            "wrong_type", f"event-time field {name!r} is {value!r}: give epoch seconds, epoch ms or ISO-8601 text"
        )


def to_chunk(rows: list[Row], categorical: int, dense: int, tasks: int) -> Chunk:
    """Rows as one column chunk; ``positions`` are the events' places."""
    n = len(rows)
    return Chunk(
        positions=np.fromiter((r.place for r in rows), dtype=np.int64, count=n),
        event_time_ms=np.fromiter((r.event_time_ms for r in rows), dtype=np.int64, count=n),
        example_ids=np.fromiter((r.example_id for r in rows), dtype=np.int64, count=n),
        users=np.fromiter((r.user for r in rows), dtype=np.int64, count=n),
        categorical=np.array([r.categorical for r in rows], dtype=np.int64).reshape(n, categorical),
        dense=np.array([r.dense for r in rows], dtype=np.float32).reshape(n, dense),
        labels=np.array([r.labels for r in rows], dtype=np.float32).reshape(n, tasks),
    )
