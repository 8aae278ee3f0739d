"""A Schema Registry for the tests: the part of Confluent's REST API that its serializers and
deserializers call, over real HTTP, with real schema ids and a real compatibility check.

- ``POST /subjects/{subject}/versions`` registers an Avro schema: it must parse (else 422,
  error code 42201); the same canonical schema gets the same global id in any subject; a new
  version must be BACKWARD compatible with the subject's latest (data written with the old one
  is read with the new as reader: else 409, error code 409);
- ``GET /schemas/ids/{id}`` answers the schema, or 404 with error code 40403;
- ``GET /subjects``, ``GET /subjects/{subject}/versions`` and ``.../versions/{n|latest}``.

Storage is in memory. ``requests`` records every (method, path) for the tests to check.
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

import fastavro
from fastavro.schema import to_parsing_canonical_form
from fastavro.utils import generate_many

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class IncompatibleSchema(ValueError):
    pass


def check_backward(old: dict, new: dict, samples: int = 20) -> None:
    """Records written with ``old`` must be readable with ``new`` (Avro schema resolution)."""
    for record in generate_many(old, samples):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, old, record)
        buf.seek(0)
        try:
            fastavro.schemaless_reader(buf, old, new)
        except Exception as exc:  # fastavro's SchemaResolutionError and kin
            raise IncompatibleSchema(f"{type(exc).__name__}: {exc}") from None


class Registry:
    """The store: global ids by canonical form, versions by subject."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.schemas: dict[int, str] = {}  # id -> schema text as registered first
        self.ids: dict[str, int] = {}  # canonical form -> id
        self.subjects: dict[str, list[int]] = {}  # subject -> ids by version
        self.requests: list[tuple[str, str]] = []

    def register(self, subject: str, text: str) -> int:
        parsed = fastavro.parse_schema(json.loads(text))
        canonical = to_parsing_canonical_form(parsed)
        with self.lock:
            versions = self.subjects.setdefault(subject, [])
            known = self.ids.get(canonical)
            if known is not None and known in versions:
                return known
            if versions:
                check_backward(fastavro.parse_schema(json.loads(self.schemas[versions[-1]])), parsed)
            if known is None:
                known = len(self.schemas) + 1
                self.schemas[known] = text
                self.ids[canonical] = known
            versions.append(known)
            return known


class _Handler(BaseHTTPRequestHandler):
    registry: Registry

    def log_message(self, *args: Any) -> None:  # quiet: pytest shows failures, not access logs
        pass

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: int, message: str) -> None:
        self._answer(status, {"error_code": code, "message": message})

    def _parts(self) -> list[str]:
        path = urlparse(self.path).path
        self.registry.requests.append((self.command, path))
        return [unquote(p) for p in path.strip("/").split("/") if p]

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        reg, parts = self.registry, self._parts()
        if len(parts) == 3 and parts[:2] == ["schemas", "ids"] and parts[2].isdigit():
            text = reg.schemas.get(int(parts[2]))
            if text is None:
                return self._error(404, 40403, f"Schema {parts[2]} not found")
            return self._answer(200, {"schema": text})
        if parts == ["subjects"]:
            return self._answer(200, sorted(reg.subjects))
        if len(parts) >= 3 and parts[0] == "subjects" and parts[2] == "versions":
            versions = reg.subjects.get(parts[1])
            if not versions:
                return self._error(404, 40401, f"Subject '{parts[1]}' not found")
            if len(parts) == 3:
                return self._answer(200, list(range(1, len(versions) + 1)))
            n = len(versions) if parts[3] == "latest" else int(parts[3]) if parts[3].isdigit() else 0
            if not 1 <= n <= len(versions):
                return self._error(404, 40402, f"Version {parts[3]} not found")
            sid = versions[n - 1]
            return self._answer(200, {"subject": parts[1], "version": n, "id": sid, "schema": reg.schemas[sid]})
        return self._error(404, 404, f"no such resource {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        parts = self._parts()
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if len(parts) == 3 and parts[0] == "subjects" and parts[2] == "versions":
            if body.get("schemaType", "AVRO") != "AVRO":
                return self._error(422, 42201, "only Avro schemas are served here")
            try:
                sid = self.registry.register(parts[1], body["schema"])
            except IncompatibleSchema as exc:
                return self._error(409, 409, f"Schema being registered is incompatible with an earlier schema: {exc}")
            except (KeyError, ValueError, TypeError, fastavro.schema.SchemaParseException) as exc:
                return self._error(422, 42201, f"Invalid schema: {exc}")
            return self._answer(200, {"id": sid})
        return self._error(404, 404, f"no such resource {self.path}")


class RegistryServer:
    """``with RegistryServer() as r:`` serves on ``r.url`` (a free loopback port)."""

    def __init__(self) -> None:
        self.registry = Registry()
        handler = type("Handler", (_Handler,), {"registry": self.registry})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="schema-registry", daemon=True)

    def __enter__(self) -> RegistryServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
