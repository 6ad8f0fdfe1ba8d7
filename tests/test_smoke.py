from conftest import snapshot


def test_queue_starts_and_reports_stats(evp):
    _, address = evp.queue()
    result = evp.run("publish", "--queue", address, "--count", "100", "--rate", "0")
    assert result.returncode == 0, result.stderr.decode()
    topics = snapshot(address)["topics"]
    assert topics[0]["events"] == 100
