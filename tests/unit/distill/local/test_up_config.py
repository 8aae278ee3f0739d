"""The config ``distill up`` writes for its children: no secret in the file, the secrets in the
children's environment, and the two together load as the parent's config."""

from __future__ import annotations

import sys

import pytest

from distill.core.config import load_config
from distill.local.report import write_report
from distill.local.up import is_secret_extra, secret_fields, write_child_config

PASSWORD = "s3cr3t-sasl-7f1c"
KEY_PASSWORD = "s3cr3t-key-92ab"
CLIENT_SECRET = "s3cr3t-oidc-40de"
PEM = "-----BEGIN PRIVATE KEY-----s3cr3t-pem-55aa-----END PRIVATE KEY-----"
REGISTRY = "distill:s3cr3t-registry-13ef"


def _config(tmp_path, **kafka):
    return load_config(None, environ={}, state_dir=str(tmp_path / "state"), kafka=kafka)


def test_every_secret_field_of_the_config_is_found():
    """The config marks its secrets repr=False; each one of them, wherever it sits, is found."""
    config = load_config(
        None,
        environ={},
        kafka={"sasl_password": PASSWORD, "ssl_key_password": KEY_PASSWORD},
        events={"schema_registry": {"url": "http://registry:8081", "basic_auth_user_info": REGISTRY}},
    )
    assert dict(secret_fields(config)) == {
        ("kafka", "sasl_password"): PASSWORD,
        ("kafka", "ssl_key_password"): KEY_PASSWORD,
        ("events", "schema_registry", "basic_auth_user_info"): REGISTRY,
    }
    assert REGISTRY not in repr(config) and PASSWORD not in repr(config)


def test_secrets_stay_out_of_the_file_and_reach_the_children_through_their_environment(tmp_path):
    config = _config(
        tmp_path,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="distill-app",
        sasl_password=PASSWORD,
        ssl_key_password=KEY_PASSWORD,
        extra={
            "sasl.oauthbearer.client.secret": CLIENT_SECRET,
            "ssl.key.pem": PEM,
            "socket.keepalive.enable": True,
            "fetch.wait.max.ms": 25,
        },
    )
    config.events.schema_registry.basic_auth_user_info = REGISTRY
    path = tmp_path / "config.yaml"
    env = write_child_config(config, path)

    text = path.read_text()
    for secret in (PASSWORD, KEY_PASSWORD, CLIENT_SECRET, PEM, REGISTRY, "s3cr3t"):
        assert secret not in text
    assert "socket.keepalive.enable" in text and "distill-app" in text  # the rest is all there
    assert set(env) == {
        "DISTILL_KAFKA__SASL_PASSWORD",
        "DISTILL_KAFKA__SSL_KEY_PASSWORD",
        "DISTILL_KAFKA__EXTRA",
        "DISTILL_EVENTS__SCHEMA_REGISTRY__BASIC_AUTH_USER_INFO",
    }
    # What a child loads: the file under the environment is the parent's config, secrets included.
    assert load_config(path, environ=env) == config
    # Without the environment the child would have no password: the file alone does not hold it.
    assert load_config(path, environ={}).kafka.sasl_password is None


def test_a_config_without_secrets_needs_no_environment(tmp_path):
    config = _config(tmp_path, extra={"socket.keepalive.enable": True})
    path = tmp_path / "config.yaml"
    assert write_child_config(config, path) == {}
    assert load_config(path, environ={}) == config


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("sasl.password", True),
        ("ssl.keystore.password", True),
        ("sasl.oauthbearer.client.secret", True),
        ("sasl.oauthbearer.config", True),
        ("ssl.key.pem", True),
        ("ssl.certificate.pem", False),
        ("sasl.username", False),
        ("linger.ms", False),
    ],
)
def test_which_extra_properties_are_secrets(key, secret):
    assert is_secret_extra(key) is secret


def test_the_report_is_written_without_matplotlib(tmp_path, monkeypatch):
    """matplotlib is optional (worker images do not carry it): the report's text and JSON are
    written all the same, and only report.png is missing."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    report = {
        "source": "synthetic",
        "examples_produced": 10,
        "duration_s": 1.0,
        "teacher": {"name": "teacher", "examples_labeled": 10, "metrics": {"click": {"auc": 0.7, "logloss": 0.6}}},
        "students": {
            "none": {
                "mode": "none",
                "examples_trained": 10,
                "join": {"joined": 0, "missing": 1, "late": 0, "duplicate": 0},
                "metrics": {"click": {"auc": 0.6, "logloss": 0.65}},
                "teacher_on_same_batches": {"click": {"auc": 0.7, "logloss": 0.6}},
            },
        },
    }
    paths = write_report(report, tmp_path / "report", tmp_path / "progress")
    assert set(paths) == {"json", "md"}
    assert paths["md"].read_text().startswith("# online-distill run: synthetic")
    assert not (tmp_path / "report" / "report.png").exists()
