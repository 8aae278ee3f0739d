"""Configuration: files, DISTILL_ overrides, and errors that name the field and what is allowed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.core.config import CheckpointConfig, Config, StudentConfig, load_config
from distill.core.exceptions import ConfigError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(*args, **kwargs) -> str:
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as err:
        load_config(*args, **kwargs)
    return str(err.value)


TOML = """
    [kafka]
    bootstrap_servers = "kafka-0:9092,kafka-1:9092"
    compression_type = "zstd"

    [topics]
    examples = "ex"
    labels = "lb"
    partitions = 12

    [[tasks]]
    name = "click"

    [[tasks]]
    name = "dwell"
    type = "regression"

    [teacher.model]
    hidden = [64, 32]

    [[students]]
    name = "tiny"
    mode = "direct"
    distill_tasks = ["dwell"]
"""

YAML = """
    kafka:
      bootstrap_servers: "kafka-0:9092,kafka-1:9092"
      compression_type: zstd
    topics: {examples: ex, labels: lb, partitions: 12}
    tasks:
      - name: click
      - {name: dwell, type: regression}
    teacher:
      model: {hidden: [64, 32]}
    students:
      - {name: tiny, mode: direct, distill_tasks: [dwell]}
"""


def check_file_config(cfg: Config) -> None:
    assert cfg.kafka.bootstrap_servers == "kafka-0:9092,kafka-1:9092"
    assert cfg.kafka.compression_type == "zstd"
    assert (cfg.topics.examples, cfg.topics.labels, cfg.topics.partitions) == ("ex", "lb", 12)
    assert cfg.task_types() == {"click": "binary", "dwell": "regression"}
    assert cfg.teacher.model.hidden == [64, 32]
    # The other model keys keep the teacher's defaults, not ModelConfig's.
    default = Config().teacher.model
    assert cfg.teacher.model == default.model_copy(update={"hidden": [64, 32]})
    assert cfg.teacher.device == "auto"
    assert [s.name for s in cfg.students] == ["tiny"]
    assert cfg.student("tiny").mode == "direct"
    assert cfg.student("tiny").distill_tasks == ["dwell"]
    assert cfg.student("tiny").group_id == "student.tiny"


# -- defaults and files ------------------------------------------------------------------------
def test_defaults_are_valid():
    cfg = load_config(None, environ={})
    assert cfg == Config()
    assert [t.name for t in cfg.tasks] == ["click", "watch"]
    assert [s.name for s in cfg.students] == ["none", "direct", "aux"]
    assert {s.mode for s in cfg.students} == {"none", "direct", "aux"}
    assert cfg.topics.dlq(cfg.topics.examples) == "examples.dlq"
    assert cfg.wire.non_finite == "reject"


def test_toml_file(tmp_path):
    check_file_config(load_config(write(tmp_path, "c.toml", TOML), environ={}))


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_file(tmp_path, suffix):
    check_file_config(load_config(write(tmp_path, "c" + suffix, YAML), environ={}))


def test_toml_and_yaml_agree(tmp_path):
    a = load_config(write(tmp_path, "c.toml", TOML), environ={})
    b = load_config(str(write(tmp_path, "c.yaml", YAML)), environ={})
    assert a == b


def test_empty_yaml_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "c.yaml", ""), environ={}) == Config()


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, "c.toml", TOML)
    cfg = load_config(None, environ={"DISTILL_CONFIG": str(path)})
    assert cfg.topics.partitions == 12


def test_partial_model_sections_keep_the_role_defaults():
    cfg = load_config(
        None, environ={"DISTILL_TEACHER__MODEL__DROPOUT": "0.1"}, students=[{"name": "s", "model": {"hidden": [16]}}]
    )
    teacher_default = Config().teacher.model
    student_default = StudentConfig(name="x").model
    assert teacher_default != student_default  # else this test proves nothing
    assert cfg.teacher.model == teacher_default.model_copy(update={"dropout": 0.1})
    assert cfg.student("s").model == student_default.model_copy(update={"hidden": [16]})


# -- environment overrides ---------------------------------------------------------------------
def test_env_overrides_scalars_and_nested(tmp_path):
    env = {
        "DISTILL_KAFKA__BOOTSTRAP_SERVERS": "broker:9093",
        "DISTILL_TOPICS__PARTITIONS": "8",
        "DISTILL_TEACHER__DEVICE": "cpu",
        "DISTILL_TEACHER__MODEL__DROPOUT": "0.25",
        "DISTILL_TEACHER__CHECKPOINT__EVERY_BATCHES": "17",
        "DISTILL_FILE__SORT_BY_TIME": "false",
        "DISTILL_PRODUCER__RATE": "1500.5",
        "HOME": "/ignored",
        "KAFKA__X": "ignored too",
    }
    cfg = load_config(write(tmp_path, "c.toml", TOML), environ=env)
    assert cfg.kafka.bootstrap_servers == "broker:9093"
    assert cfg.topics.partitions == 8
    assert cfg.topics.examples == "ex"  # the file's other keys of that section stay
    assert cfg.teacher.device == "cpu"
    assert cfg.teacher.model.dropout == 0.25
    assert cfg.teacher.model.hidden == [64, 32]
    assert cfg.teacher.checkpoint.every_batches == 17
    assert cfg.file.sort_by_time is False
    assert cfg.producer.rate == 1500.5


def test_checkpoints_are_by_time_unless_a_batch_count_is_set():
    by_time = Config().teacher.checkpoint
    assert by_time == Config().student("aux").checkpoint and by_time.every_batches is None
    assert not by_time.due(batches=10**9, seconds=by_time.every_seconds - 0.1)
    assert by_time.due(batches=1, seconds=by_time.every_seconds)
    assert not by_time.due(batches=0, seconds=10**9)  # nothing trained since the last one
    both = CheckpointConfig(every_seconds=30, every_batches=100)
    assert both.due(batches=100, seconds=0) and both.due(batches=1, seconds=30)
    assert not both.due(batches=99, seconds=29.9)


def test_env_json_values():
    env = {
        "DISTILL_TEACHER__MODEL__HIDDEN": "[128, 64, 32]",
        "DISTILL_TASKS": json.dumps([{"name": "a"}, {"name": "b", "type": "regression"}]),
        "DISTILL_STUDENTS": json.dumps([{"name": "s1", "distill_tasks": ["b"]}]),
        "DISTILL_KAFKA__EXTRA": json.dumps({"socket.keepalive.enable": True, "fetch.wait.max.ms": 50}),
        "DISTILL_PRODUCER__RATE": "null",
    }
    cfg = load_config(None, environ=env)
    assert cfg.teacher.model.hidden == [128, 64, 32]
    assert cfg.task_types() == {"a": "binary", "b": "regression"}
    assert cfg.student("s1").distill_tasks == ["b"]
    assert cfg.kafka.extra == {"socket.keepalive.enable": True, "fetch.wait.max.ms": 50}
    assert cfg.producer.rate is None


@pytest.mark.parametrize("raw", ["12345", "1.50", "1e3", "true", "007", "hunter two"])
def test_env_strings_are_kept_exactly(raw):
    """A password or a topic name that looks like a number or a bool stays that string."""
    env = {"DISTILL_KAFKA__SASL_PASSWORD": raw, "DISTILL_TOPICS__EXAMPLES": raw}
    cfg = load_config(None, environ=env)
    assert cfg.kafka.sasl_password == raw
    assert cfg.topics.examples == raw


def test_precedence_keywords_over_env_over_file(tmp_path):
    path = write(tmp_path, "c.toml", TOML)
    env = {"DISTILL_TOPICS__PARTITIONS": "8", "DISTILL_TOPICS__EXAMPLES": "from-env"}
    cfg = load_config(path, environ=env, topics={"partitions": 3})
    assert cfg.topics.partitions == 3  # keyword
    assert cfg.topics.examples == "from-env"  # environment
    assert cfg.topics.labels == "lb"  # file


def test_env_value_and_section_at_once():
    with pytest.raises(ConfigError, match="DISTILL_KAFKA__CLIENT_ID"):
        load_config(None, environ={"DISTILL_KAFKA": "x", "DISTILL_KAFKA__CLIENT_ID": "y"})


# -- errors ------------------------------------------------------------------------------------
def test_unknown_key_in_file_names_the_field(tmp_path):
    msg = error_of(write(tmp_path, "c.toml", '[kafka]\nbootstrap_serverz = "x"\n'))
    assert "kafka.bootstrap_serverz" in msg
    assert "unknown key" in msg
    assert "c.toml" in msg  # says where it came from


def test_unknown_key_from_env_names_the_field():
    msg = error_of(None, environ={"DISTILL_TEACHER__MODEL__HIDEN": "[1]"})
    assert "teacher.model.hiden" in msg and "unknown key" in msg


def test_unknown_section():
    assert "kafkaa: unknown key" in error_of(None, kafkaa={"x": 1})


def test_wrong_type_names_the_field():
    msg = error_of(None, environ={"DISTILL_TOPICS__PARTITIONS": "many"})
    assert "topics.partitions" in msg
    assert "integer" in msg


def test_out_of_range_names_the_field_and_bound():
    msg = error_of(None, topics={"partitions": 0})
    assert "topics.partitions" in msg and "greater than or equal to 1" in msg


def test_wrong_type_inside_a_list_names_the_index():
    msg = error_of(None, teacher={"model": {"hidden": [64, "wide"]}})
    assert "teacher.model.hidden.1" in msg


def test_literal_error_lists_allowed_values():
    msg = error_of(None, environ={"DISTILL_TEACHER__DEVICE": "gpu"})
    assert "teacher.device" in msg
    for allowed in ("'auto'", "'cpu'", "'cuda'"):
        assert allowed in msg
    assert "got 'gpu'" in msg


def test_literal_error_in_a_list_item():
    msg = error_of(None, students=[{"name": "s", "mode": "soft"}])
    assert "students.0.mode" in msg
    assert "'aux'" in msg and "'direct'" in msg and "'none'" in msg


def test_duplicate_task_names():
    msg = error_of(None, tasks=[{"name": "click"}, {"name": "click", "type": "regression"}])
    assert "tasks" in msg and "unique" in msg and "click" in msg


def test_duplicate_student_names():
    msg = error_of(None, students=[{"name": "a"}, {"name": "a"}])
    assert "students: names must be unique" in msg


def test_no_tasks():
    assert "at least one task" in error_of(None, tasks=[])


def test_distill_tasks_must_be_known():
    msg = error_of(None, students=[{"name": "s", "distill_tasks": ["nope"]}])
    assert "students.s.distill_tasks" in msg and "nope" in msg and "click" in msg


def test_examples_and_labels_topics_differ():
    assert "different topics" in error_of(None, topics={"examples": "t", "labels": "t"})


def test_checkpoints_topic_differs_from_the_others():
    assert "different topics" in error_of(None, topics={"checkpoints": "labels"})


def test_teacher_role_and_pool():
    cfg = load_config(
        None, environ={"DISTILL_TEACHER__ROLE": "labeler", "DISTILL_TEACHER__POOL__MAX_LEAD_VERSIONS": "4"}
    )
    assert cfg.teacher.role == "labeler" and cfg.teacher.pool.max_lead_versions == 4
    assert cfg.model_store() == str(cfg.state_dir / "model-store")
    assert load_config(None, environ={}, teacher={"pool": {"model_store": "/mnt/store"}}).model_store() == "/mnt/store"
    s3 = load_config(None, environ={}, teacher={"pool": {"model_store": "s3://models/pool"}}, model_root="s3://b/m/")
    assert s3.model_store() == "s3://models/pool" and s3.model_dir("aux") == "s3://b/m/aux"
    assert cfg.model_dir("aux") == str(cfg.state_dir / "models" / "aux")
    assert cfg.student("aux").export.keep == 5 and cfg.student("aux").export.promote
    msg = error_of(None, teacher={"role": "observer"})
    assert "teacher.role" in msg and "'both', 'trainer' or 'labeler'" in msg
    assert "teacher.pool.max_lead_versions" in error_of(None, teacher={"pool": {"max_lead_versions": 0}})


def test_bad_task_name_pattern():
    assert "tasks.0.name" in error_of(None, tasks=[{"name": "has space"}])


def test_unknown_student_lookup():
    with pytest.raises(ConfigError, match=r"no student named 'zz'.*\['none', 'direct', 'aux'\]"):
        Config().student("zz")


def test_missing_file(tmp_path):
    msg = error_of(tmp_path / "nope.toml")
    assert "does not exist" in msg and "nope.toml" in msg


def test_invalid_toml(tmp_path):
    msg = error_of(write(tmp_path, "c.toml", "[kafka\nbootstrap_servers = 1\n"))
    assert "not valid TOML" in msg and "c.toml" in msg


def test_invalid_yaml(tmp_path):
    msg = error_of(write(tmp_path, "c.yaml", "kafka: [unclosed\n"))
    assert "not valid YAML" in msg


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    assert "top level" in error_of(write(tmp_path, "c.yaml", "- a\n- b\n"))


def test_unsupported_suffix(tmp_path):
    assert ".toml, .yaml or .yml" in error_of(write(tmp_path, "c.json", "{}"))


# -- the check-config command ------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch) -> CliRunner:
    for key in list(__import__("os").environ):
        if key.startswith("DISTILL_"):
            monkeypatch.delenv(key)
    return CliRunner()


def test_check_config_bad_file_exits_non_zero_naming_the_field(cli, tmp_path):
    path = write(tmp_path, "bad.toml", '[teacher]\ndevice = "gpu"\n[topics]\npartitionz = 3\n')
    result = cli.invoke(app, ["check-config", "--config", str(path)])
    assert result.exit_code != 0
    assert "teacher.device" in result.output and "'cuda'" in result.output
    assert "topics.partitionz" in result.output
    assert "Traceback" not in result.output


def test_check_config_missing_file(cli, tmp_path):
    result = cli.invoke(app, ["check-config", "-c", str(tmp_path / "missing.yaml")])
    assert result.exit_code != 0
    assert "does not exist" in result.output


def test_check_config_bad_env(cli):
    result = cli.invoke(app, ["check-config"], env={"DISTILL_STUDENTS__0": "x"})
    assert result.exit_code != 0
    assert "students" in result.output


def test_check_config_good_file_prints_it_without_secrets(cli, tmp_path):
    path = write(tmp_path, "c.toml", TOML)
    secrets = {"DISTILL_KAFKA__SASL_PASSWORD": "hunter2", "DISTILL_KAFKA__SSL_KEY_PASSWORD": "k3y"}
    result = cli.invoke(app, ["check-config", "--config", str(path)], env=secrets)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["topics"]["partitions"] == 12
    assert "hunter2" not in result.output and "k3y" not in result.output


# -- Kubernetes service links --------------------------------------------------------------------
# What Kubernetes injects into every pod of a namespace for a Service named distill-teacher
# (and one named distill-kafka) unless enableServiceLinks is false.
SERVICE_LINKS = {
    "DISTILL_TEACHER_PORT": "tcp://10.96.12.7:9100",
    "DISTILL_TEACHER_PORT_9100_TCP": "tcp://10.96.12.7:9100",
    "DISTILL_TEACHER_PORT_9100_TCP_ADDR": "10.96.12.7",
    "DISTILL_TEACHER_PORT_9100_TCP_PORT": "9100",
    "DISTILL_TEACHER_PORT_9100_TCP_PROTO": "tcp",
    "DISTILL_TEACHER_SERVICE_HOST": "10.96.12.7",
    "DISTILL_TEACHER_SERVICE_PORT": "9100",
    "DISTILL_TEACHER_SERVICE_PORT_METRICS": "9100",
    "DISTILL_KAFKA_PORT": "tcp://10.96.3.1:9093",
    "DISTILL_KAFKA_SERVICE_HOST": "10.96.3.1",
}


def test_kubernetes_service_links_are_not_config(tmp_path):
    env = SERVICE_LINKS | {"DISTILL_TEACHER__DEVICE": "cpu", "DISTILL_KAFKA__CLIENT_ID": "c"}
    cfg = load_config(write(tmp_path, "c.toml", TOML), environ=env)
    assert cfg.teacher.device == "cpu" and cfg.kafka.client_id == "c"
    assert (
        cfg.model_dump()
        == load_config(
            write(tmp_path, "c.toml", TOML), environ={"DISTILL_TEACHER__DEVICE": "cpu", "DISTILL_KAFKA__CLIENT_ID": "c"}
        ).model_dump()
    )


def test_an_unknown_key_inside_a_section_from_env_is_still_an_error():
    assert "teacher.devic: unknown key" in error_of(None, environ={"DISTILL_TEACHER__DEVIC": "cpu"})
    assert "kafka.port: unknown key" in error_of(None, environ={"DISTILL_KAFKA__PORT": "9093"})


def test_events_section_from_env():
    env = {
        "DISTILL_EVENTS__TOPIC": "impressions",
        "DISTILL_EVENTS__CATEGORICAL": '["user_id"]',
        "DISTILL_EVENTS__LABELS": '{"click": "clicked"}',
        "DISTILL_EVENTS__SCHEMA_REGISTRY__URL": "http://registry:8081",
        "DISTILL_EVENTS__FORMAT": "avro",
    }
    cfg = load_config(None, environ=env)
    assert cfg.events.topic == "impressions" and cfg.events.labels == {"click": "clicked"}
    assert cfg.events.schema_registry.url == "http://registry:8081"
    assert "events.schema_registry.url" in error_of(None, environ={"DISTILL_EVENTS__FORMAT": "avro"})
