"""`distill up` with secrets in its config: a real run (embedded broker, producer, teacher, a
student) after which no file under state_dir or the report holds a secret. That the children
still load them (from their environment) is tests/unit/distill/local/test_up_config.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

PASSWORD = "s3cr3t-sasl-7f1c"
KEY_PASSWORD = "s3cr3t-key-92ab"
CLIENT_SECRET = "s3cr3t-oidc-40de"
REGISTRY = "distill:s3cr3t-registry-13ef"
EXAMPLES = 2000


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_distill_up_writes_no_secret_under_state_dir(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                # The embedded broker speaks PLAINTEXT: librdkafka ignores the SASL and TLS
                # settings there, but the workers load and pass them on as anywhere else.
                "kafka": {
                    "sasl_username": "distill-app",
                    "sasl_password": PASSWORD,
                    "ssl_key_password": KEY_PASSWORD,
                    "extra": {"sasl.oauthbearer.client.secret": CLIENT_SECRET},
                },
                "events": {"schema_registry": {"basic_auth_user_info": REGISTRY}},
                "topics": {"partitions": 1},
                "students": [{"name": "none", "mode": "none"}],
            }
        )
    )
    state, report = tmp_path / "state", tmp_path / "report"
    cmd = [sys.executable, "-m", "distill", "up", "--source", "synthetic", "--examples", str(EXAMPLES)]
    cmd += ["--config", str(config), "--state-dir", str(state), "--report", str(report)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((report / "report.json").read_text())
    assert result["students"]["none"]["examples_trained"] == EXAMPLES, "the run did its work"

    files = sorted(p.relative_to(tmp_path) for p in state.rglob("*") if p.is_file())
    assert Path("state/config.yaml") in files and any(p.parts[1] == "checkpoints" for p in files), files
    for secret in (PASSWORD, KEY_PASSWORD, CLIENT_SECRET, REGISTRY):
        for root in (state, report):
            assert _files_holding(root, secret.encode()) == [], f"{secret} written to disk"
    assert not [s for s in (PASSWORD, KEY_PASSWORD, CLIENT_SECRET, REGISTRY) if s in done.stdout + done.stderr]
    written = yaml.safe_load((state / "config.yaml").read_text())["kafka"]
    assert written["sasl_username"] == "distill-app"
    assert "sasl_password" not in written and "sasl.oauthbearer.client.secret" not in written["extra"]
