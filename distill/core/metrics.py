"""Every Prometheus metric the project exports, in one place (names ``distill_*``).

Each process registers these in the default registry and serves them on ``/metrics``. The
deploy tests read this registry to check that alerts and dashboards name real metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# -- every process ---------------------------------------------------------------------------
BUILD = Info("distill_build", "Version and role of this process")
READY = Gauge(
    "distill_ready", "1 when the broker is reachable and the worker is assigned partitions", ["role", "worker"]
)
HEARTBEAT = Gauge("distill_heartbeat_timestamp_seconds", "Unix time of the last loop iteration", ["role", "worker"])
DEAD_LETTERS = Counter(
    "distill_dead_letters_total", "Messages sent to a dead-letter topic", ["role", "worker", "topic", "reason"]
)
CONSUMER_LAG = Gauge(
    "distill_consumer_lag_messages", "Messages behind the high watermark", ["role", "worker", "topic", "partition"]
)

# -- producers --------------------------------------------------------------------------------
PRODUCER_EXAMPLES = Counter("distill_producer_examples_total", "Examples produced (delivered)", ["producer", "source"])
PRODUCER_BATCHES = Counter("distill_producer_batches_total", "Example batches delivered", ["producer", "source"])
PRODUCER_BYTES = Counter("distill_producer_bytes_total", "Encoded bytes delivered", ["producer", "source"])
PRODUCER_ERRORS = Counter("distill_producer_errors_total", "Delivery or encoding failures", ["producer", "source"])
PRODUCER_QUEUE = Gauge(
    "distill_producer_in_flight_batches", "Batches handed to the client but not yet acknowledged", ["producer"]
)
PRODUCER_EVENT_TIME = Gauge(
    "distill_producer_event_time_seconds", "Event time of the newest example produced", ["producer"]
)

# -- teacher ------------------------------------------------------------------------------------
TEACHER_EXAMPLES = Counter("distill_teacher_examples_labeled_total", "Examples labelled and published", ["teacher"])
TEACHER_LABEL_BATCHES = Counter("distill_teacher_label_batches_total", "Label batches published", ["teacher"])
TEACHER_TRAINED = Counter("distill_teacher_examples_trained_total", "Examples the teacher trained on", ["teacher"])
TEACHER_STEP_SECONDS = Histogram(
    "distill_teacher_step_seconds",
    "Time of one transaction, from reading its first batch to its commit (score, train, publish, commit)",
    ["teacher"],
    buckets=LATENCY_BUCKETS,
)
TEACHER_TRANSACTIONS = Counter(
    "distill_teacher_transactions_total", "Kafka transactions by outcome", ["teacher", "outcome"]
)
TEACHER_NAN = Counter(
    "distill_teacher_nan_losses_total", "Training steps skipped for a NaN or infinite loss", ["teacher"]
)
TEACHER_VERSION = Gauge(
    "distill_teacher_version",
    "Version of the teacher: its own (role both), the newest published (trainer), the newest in use (labeler)",
    ["teacher"],
)
TEACHER_LOSS = Gauge("distill_teacher_loss", "Training loss of the last step", ["teacher", "task"])
TEACHER_METRIC = Gauge(
    "distill_teacher_metric", "Progressive (predict-before-train) metric", ["teacher", "task", "metric", "window"]
)
TEACHER_CKPT_AGE = Gauge(
    "distill_teacher_checkpoint_timestamp_seconds", "Unix time of the last durable checkpoint", ["teacher"]
)
TEACHER_CKPT_SECONDS = Histogram(
    "distill_teacher_checkpoint_seconds",
    "Time from taking a checkpoint to its being durable (the write runs beside training)",
    ["teacher"],
    buckets=LATENCY_BUCKETS,
)
TEACHER_THROUGHPUT = Gauge(
    "distill_teacher_examples_per_second", "Examples labelled per second (moving average)", ["teacher"]
)

# -- teacher at scale: trainer and labelers ---------------------------------------------------
STALENESS_EXAMPLE_BUCKETS = (0, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
TEACHER_STALENESS_EXAMPLES = Histogram(
    "distill_teacher_label_staleness_examples",
    "Labelled batch's offset minus the watermark of the checkpoint that labelled it, times the batch size",
    ["teacher"],
    buckets=STALENESS_EXAMPLE_BUCKETS,
)
TEACHER_STALENESS_SECONDS = Histogram(
    "distill_teacher_label_staleness_seconds",
    "Kafka time of the labelled batch minus that of the last batch its checkpoint trained on",
    ["teacher"],
    buckets=(*DELAY_BUCKETS, 600, 1800, 3600, 7200),  # a lagging pool is minutes to hours stale
)
TEACHER_RELOADS = Counter(
    "distill_teacher_reloads_total",
    "Checkpoints a labeler loaded: source=announcement (hot reload) or store (an evicted one read back)",
    ["teacher", "source"],
)
TEACHER_RELOAD_SECONDS = Histogram(
    "distill_teacher_reload_seconds", "Time to read, verify and load a checkpoint", ["teacher"], buckets=LATENCY_BUCKETS
)
TEACHER_NO_CHECKPOINT = Counter(
    "distill_teacher_label_waits_total",
    "Example batches put back because no out-of-sample checkpoint was known for them yet",
    ["teacher"],
)
TEACHER_STALE_WAITS = Counter(
    "distill_teacher_stale_waits_total",
    "Example batches put back to wait for a checkpoint within teacher.pool.max_label_staleness_examples",
    ["teacher"],
)
TEACHER_STALE_LABELS = Counter(
    "distill_teacher_stale_labels_total",
    "Label batches from a checkpoint beyond max_label_staleness_examples (the trainer had passed the batch)",
    ["teacher"],
)
TEACHER_PUBLISHED = Counter(
    "distill_teacher_checkpoints_published_total", "Checkpoints the trainer published and announced", ["teacher"]
)
TEACHER_LEAD_VERSIONS = Gauge(
    "distill_teacher_trainer_lead_versions",
    "Newest published version minus the oldest version the labelers may still need",
    ["teacher"],
)
TEACHER_LEAD_BATCHES = Gauge(
    "distill_teacher_trainer_lead_batches",
    "Example batches trained on but not yet labelled (trained-through minus the labelers' committed offsets)",
    ["teacher"],
)
TEACHER_PAUSED = Gauge(
    "distill_teacher_trainer_paused",
    "1 while the trainer waits for the labelers (teacher.pool.max_lead_versions)",
    ["teacher"],
)

# -- students -----------------------------------------------------------------------------------
STUDENT_EXAMPLES = Counter("distill_student_examples_trained_total", "Examples trained on", ["student"])
STUDENT_BATCHES = Counter("distill_student_batches_trained_total", "Example batches trained on", ["student"])
STUDENT_JOIN = Counter(
    "distill_student_join_total", "Join outcomes per example batch or label batch", ["student", "outcome"]
)
STUDENT_COVERAGE = Gauge(
    "distill_student_label_coverage", "Fraction of recent batches trained with a teacher label", ["student"]
)
STUDENT_LABEL_DELAY = Histogram(
    "distill_student_label_delay_seconds", "Label arrival minus example arrival", ["student"], buckets=DELAY_BUCKETS
)
STUDENT_LABEL_STALENESS = Histogram(
    "distill_student_label_staleness_examples",
    "Received label's batch offset minus its checkpoint's watermark, times the batch size (0: as fresh as one teacher)",
    ["student"],
    buckets=STALENESS_EXAMPLE_BUCKETS,
)
STUDENT_LOSS = Gauge("distill_student_loss", "Training loss of the last step", ["student", "task", "head"])
STUDENT_SOFT_WEIGHT = Gauge(
    "distill_student_soft_weight",
    "Soft-label weight in effect for a distilled task (the teacher-quality gate's output)",
    ["student", "task"],
)
STUDENT_TEACHER_LEAD = Gauge(
    "distill_student_teacher_lead_ratio",
    "Smoothed relative lead of the received labels over the student's serving head: "
    "(serving-head loss - label loss) / serving-head loss; negative when the labels are worse",
    ["student", "task"],
)
STUDENT_METRIC = Gauge(
    "distill_student_metric",
    "Progressive (predict-before-train) metric; head=teacher scores the teacher's labels",
    ["student", "task", "head", "metric", "window"],
)
STUDENT_NAN = Counter(
    "distill_student_nan_losses_total", "Training steps skipped for a NaN or infinite loss", ["student"]
)
STUDENT_PENDING = Gauge("distill_student_pending_batches", "Example batches waiting in the join buffers", ["student"])
STUDENT_PAUSED = Gauge("distill_student_paused_partitions", "Partitions paused by back-pressure", ["student", "topic"])
STUDENT_CKPT_AGE = Gauge(
    "distill_student_checkpoint_timestamp_seconds", "Unix time of the last durable checkpoint", ["student"]
)
STUDENT_CKPT_SECONDS = Histogram(
    "distill_student_checkpoint_seconds", "Time to write a checkpoint", ["student"], buckets=LATENCY_BUCKETS
)
STUDENT_CKPT_FAILURES = Counter(
    "distill_student_checkpoint_failures_total", "Checkpoints that could not be written", ["student"]
)
STUDENT_EXPORT_VERSION = Gauge(
    "distill_student_export_version", "Version of the newest exported serving model", ["student"]
)
STUDENT_PROMOTED_VERSION = Gauge(
    "distill_student_promoted_version", "Version the serving stack serves (PROMOTED; 0: none yet)", ["student"]
)
STUDENT_EXPORT_VERSIONS = Gauge(
    "distill_student_export_versions", "Exported versions kept in the model root after retention", ["student"]
)
STUDENT_EXPORT_BYTES = Gauge(
    "distill_student_export_bytes", "Bytes of the student's exported versions in the model root", ["student"]
)
STUDENT_PROMOTIONS_HELD = Counter(
    "distill_student_promotions_held_total", "Exports the promotion rule did not promote", ["student"]
)
STUDENT_THROUGHPUT = Gauge(
    "distill_student_examples_per_second", "Examples trained per second (moving average)", ["student"]
)


def metric_names() -> set[str]:
    """Every sample name this module can export (counters add _total, histograms _bucket...)."""
    from prometheus_client import REGISTRY

    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("distill_"):
            continue
        for sample in family.samples:
            names.add(sample.name)
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


class Throughput:
    """Exponentially weighted examples/s, updated per batch."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.rate = 0.0

    def update(self, examples: int, seconds: float) -> float:
        if seconds > 0:
            sample = examples / seconds
            self.rate = sample if self.rate == 0 else self.alpha * sample + (1 - self.alpha) * self.rate
        return self.rate


# -- teacher pool: partition ownership --------------------------------------------------------
# Readiness of a labeler means connected and able to work; whether it owns partitions is this
# (0 for a surge pod, or with more labelers than partitions).
TEACHER_ASSIGNED_PARTITIONS = Gauge(
    "distill_teacher_assigned_partitions", "Partitions of the examples topic this labeler owns", ["teacher"]
)

# -- the events source (distill produce events) -------------------------------------------------
EVENTS_CONSUMED = Counter("distill_events_consumed_total", "Events read from the events topic", ["producer"])
EVENTS_REJECTED = Counter(
    "distill_events_rejected_total", "Events sent to the events topic's DLQ, by reason", ["producer", "reason"]
)
EVENTS_BUFFERED = Gauge("distill_events_buffered", "Events mapped and waiting for their batch", ["producer"])


def set_teacher_metrics(teacher: str, values: list[tuple[str, str, str, str, float]]) -> None:
    """``distill_teacher_metric`` from a teacher's progressive metrics (task, head, metric,
    window, value): the main head's."""
    for task, head, metric, window, value in values:
        if head == "main":
            TEACHER_METRIC.labels(teacher, task, metric, window).set(value)
