"""/metrics over real HTTP, served by prometheus_client's own handler: the format follows the
Accept header (OpenMetrics for a Prometheus that asks for it), gzip when accepted; /healthz and
/readyz answer as before."""

from __future__ import annotations

import gzip
import http.client
import json
import uuid
from collections.abc import Iterator

import pytest

from distill.core import metrics as m
from distill.core.service import Service

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service(role="test", worker=f"w-{uuid.uuid4().hex[:6]}", host="127.0.0.1")
    s.start_http()
    s.heartbeat()
    s.set_ready(True, "connected")
    yield s
    s.shutdown_http()


def request(port: int, path: str, **headers: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def test_openmetrics_and_gzip_when_the_scraper_asks(service):
    m.DEAD_LETTERS.labels("test", service.worker, "examples.dlq", "decode").inc()
    code, headers, body = request(service.port, "/metrics", Accept=OPENMETRICS, **{"Accept-Encoding": "gzip"})
    assert code == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(body).decode()
    assert text.endswith("# EOF\n"), "OpenMetrics ends with # EOF"
    assert "# TYPE distill_dead_letters counter" in text  # OpenMetrics names the family without _total
    assert (
        f'distill_dead_letters_total{{reason="decode",role="test",topic="examples.dlq",worker="{service.worker}"}} 1.0'
        in text
    )
    assert f'distill_ready{{role="test",worker="{service.worker}"}} 1.0' in text


def test_text_format_without_accept_and_no_gzip_unless_accepted(service):
    code, headers, body = request(service.port, "/metrics")
    assert code == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["Content-Encoding"] is None
    text = body.decode()
    assert "# TYPE distill_dead_letters_total counter" in text and "# EOF" not in text
    assert f'distill_ready{{role="test",worker="{service.worker}"}} 1.0' in text


def test_metrics_can_be_restricted_by_name(service):
    code, _, body = request(service.port, "/metrics?name[]=distill_ready")
    assert code == 200
    names = {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if not line.startswith("#")}
    assert names == {"distill_ready"}


def test_scrape_reports_readiness_as_of_the_scrape(service):
    """distill_ready is refreshed by each scrape (a stalled step turns it 0 without a set_ready)."""
    service.busy_ready_s = 0.0
    service._last_beat -= 1.0  # the step has run for a second
    _, _, body = request(service.port, "/metrics", Accept=OPENMETRICS)
    assert f'distill_ready{{role="test",worker="{service.worker}"}} 0.0' in body.decode()


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_endpoints_answer_as_before_even_when_gzip_or_openmetrics_is_asked(service, path):
    code, headers, body = request(service.port, path, Accept=OPENMETRICS, **{"Accept-Encoding": "gzip"})
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Encoding"] is None
    assert headers["Content-Length"] == str(len(body))
    reply = json.loads(body)
    assert reply["ok"] is True and reply["role"] == "test" and reply["worker"] == service.worker


def test_unknown_paths_are_404(service):
    code, headers, body = request(service.port, "/nope")
    assert code == 404 and headers["Content-Type"] == "text/plain"
    assert b"/metrics" in body
