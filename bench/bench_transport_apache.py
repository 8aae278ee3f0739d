"""The transport ceiling on Apache Kafka beside the embedded broker, in one run.

The same run as bench_pipeline's first row (a null teacher and the demo's three null students
as separate processes over a 3 M-example backlog, each broker's default client settings (the
local profile on the embedded broker, as `distill up` runs it), the slowest
student's steady rate), once on the embedded broker and once on one Apache Kafka node (KRaft,
broker and controller in one JVM, started from the jars ``make kafka-jars`` resolves; the row
says so and is left out when they are not there). The CPU rows say where each run's CPU went:
on 2 cores the broker's own share is what no worker change can take back. A third run on
Apache Kafka with librdkafka's own fetch wait (500 ms) says what the built-in 100 ms is worth:
the students pause and resume their example partitions (the join's backpressure), and a
resumed partition waits for the fetch in flight.
"""

from __future__ import annotations

from pathlib import Path

from bench.bench_pipeline import NULL_EXAMPLES, NULL_MODEL, cpu_rows, end_to_end
from distill.core.config import Config
from tests.kafka.apache import ApacheKafka, unavailable

STUDENTS = [s.name for s in Config().students]
NULL = {"teacher": {"model": NULL_MODEL}, "students": [{"name": n, "model": NULL_MODEL} for n in STUDENTS]}
LIBRDKAFKA_FETCH_WAIT = {"kafka": {"extra": {"fetch.wait.max.ms": 500}}}


class WarmApacheKafka(ApacheKafka):
    """One node whose internal topics exist before the workers join (else their first group
    join and first transaction wait seconds for them)."""

    def __enter__(self) -> ApacheKafka:
        self.start()
        self.warm_up()
        return self


def apache_broker(tmp: Path) -> ApacheKafka:
    return WarmApacheKafka(root=tmp / "apache-kafka")


def run() -> list[dict]:
    reason = unavailable()
    if reason:
        return [{"name": "transport ceiling on Apache Kafka", "value": "not run", "unit": reason}]
    embedded_cpu: dict[str, float] = {}
    apache_cpu: dict[str, float] = {}
    embedded = end_to_end(NULL_EXAMPLES, NULL, cpu=embedded_cpu)
    apache = end_to_end(NULL_EXAMPLES, NULL, cpu=apache_cpu, broker_of=apache_broker)
    long_wait = end_to_end(NULL_EXAMPLES, NULL, LIBRDKAFKA_FETCH_WAIT, broker_of=apache_broker)
    rows = [
        {
            "name": f"transport ceiling on Apache Kafka (1 node): null teacher + {len(STUDENTS)} null students",
            "value": apache,
            "unit": "examples/s",
            "ratio": apache / embedded,
            "vs": f"the embedded broker in the same run, {embedded:,.0f} examples/s",
        },
        {
            "name": "the same on Apache Kafka",
            "value": apache,
            "unit": "examples/s",
            "ratio": apache / 1e6,
            "vs": "aim: 1,000,000 examples/s",
        },
        {
            "name": "the same on Apache Kafka with librdkafka's fetch.wait.max.ms (500 ms)",
            "value": long_wait,
            "unit": "examples/s",
            "ratio": long_wait / apache,
            "vs": f"the built-in 100 ms in the same run, {apache:,.0f} examples/s",
        },
    ]
    for label, cpu in (("Apache Kafka", apache_cpu), ("embedded broker", embedded_cpu)):
        rows += [dict(r, name=r["name"].replace("transport ceiling", f"{label}")) for r in cpu_rows(cpu)]
    return rows
