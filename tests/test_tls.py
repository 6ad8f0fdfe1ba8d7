"""TLS between the queue and every client, with certificates made for the test."""

from __future__ import annotations

import pytest
import trustme
from conftest import wait_until


@pytest.fixture
def certificates(tmp_path):
    authority = trustme.CA()
    server = authority.issue_cert("127.0.0.1")
    ca_path = tmp_path / "ca.pem"
    cert_path = tmp_path / "server.pem"
    key_path = tmp_path / "server.key"
    authority.cert_pem.write_to_path(str(ca_path))
    server.private_key_pem.write_to_path(str(key_path))
    server.cert_chain_pems[0].write_to_path(str(cert_path))
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(str(cert_path), append=True)
    return ca_path, cert_path, key_path


@pytest.mark.timeout(120)
def test_tls_end_to_end(evp, tmp_path, certificates):
    ca, cert, key = certificates
    _, address = evp.queue(None, None, "--tls-cert", str(cert), "--tls-key", str(key))
    output = tmp_path / "out"
    evp.start(
        "process", "--queue", address, "--shards", "1", "--node", "tls",
        "--output", str(output), "--tls-ca", str(ca), log_name="process",
    )
    published = evp.run(
        "publish", "--queue", address, "--count", "200", "--rate", "0", "--tls-ca", str(ca)
    )
    assert published.returncode == 0, published.stderr.decode()

    def processed() -> int:
        path = output / "shard-0.jsonl"
        return len(path.read_bytes().splitlines()) if path.exists() else 0

    wait_until(lambda: processed() == 200, timeout_s=60, message="events did not arrive over TLS")
    stats = evp.run("stats", "--queue", address, "--once", "--json", "--tls-ca", str(ca))
    assert stats.returncode == 0, stats.stderr.decode()
    listed = evp.run("topics", "list", "--queue", address, "--json", "--tls-ca", str(ca))
    assert listed.returncode == 0, listed.stderr.decode()


@pytest.mark.timeout(60)
def test_tls_client_without_ca_rejected(evp, certificates):
    _, cert, key = certificates
    _, address = evp.queue(None, None, "--tls-cert", str(cert), "--tls-key", str(key))
    plain = evp.run("stats", "--queue", address, "--once", "--json")
    assert plain.returncode == 2
    other = trustme.CA()
    wrong_ca = evp.workdir / "other-ca.pem"
    other.cert_pem.write_to_path(str(wrong_ca))
    untrusted = evp.run("stats", "--queue", address, "--once", "--json", "--tls-ca", str(wrong_ca))
    assert untrusted.returncode == 2
    assert "TLS handshake with the queue" in untrusted.stderr.decode()


@pytest.mark.timeout(30)
def test_tls_cert_without_key_rejected(evp, certificates):
    _, cert, _ = certificates
    result = evp.run("queue", "--port", "0", "--data-dir", str(evp.workdir / "d"), "--tls-cert", str(cert))
    assert result.returncode == 2
    assert "needs both --tls-cert and --tls-key" in result.stderr.decode()
