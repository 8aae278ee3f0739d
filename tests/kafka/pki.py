"""A throw-away certificate authority for the TLS tests, made with the openssl command line:
``ca`` signs a server and a client certificate for 127.0.0.1/localhost, ``other-ca`` signs
nothing we serve (a client that trusts only it must be refused)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

OPENSSL = shutil.which("openssl")
KEYSTORE_PASSWORD = "keystore-pass"  # of the PKCS#12 files the Java broker reads; test data only


def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL, "openssl is not installed (apt-get install openssl)"
    done = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {done.stderr}")


def make_pki(d: Path) -> Path:
    """ca.pem/key, other-ca.pem/key, server.pem/key, client.pem/key, and server.p12 (the
    server's key and chain for a Java keystore). Returns ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=test {ca}",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=d,
        )  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", f"{who}.key",
            "-out", f"{who}.csr", cwd=d,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", f"{who}.pem", cwd=d,
        )  # fmt: skip
    _openssl(
        "pkcs12", "-export", "-in", "server.pem", "-inkey", "server.key", "-certfile", "ca.pem",
        "-name", "server", "-out", "server.p12", "-passout", f"pass:{KEYSTORE_PASSWORD}", cwd=d,
    )  # fmt: skip
    return d
