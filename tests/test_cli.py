"""The `evp` command line: version, help text, input errors and EVP_ variables.

Each error case runs the real command and expects an error message on stderr, a
non-zero exit code and no Python traceback.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import orjson
import pytest
import typer.main
from conftest import free_port, snapshot, wait_for_port

from evp import __version__
from evp.cli import app

COMMANDS = ["queue", "process", "publish", "stats", "demo", "replay", "tail", "route"]
# Port 1 of the loopback address is assumed to have no listener, because it is a
# privileged port and no test binds it.
UNREACHABLE = "127.0.0.1:1"
RUN_TIMEOUT_S = 30.0


def options_of(command_name: str) -> list[Any]:
    """Return the option objects typer built for one command (its vendored click types)."""
    command = typer.main.get_command(app).commands[command_name]
    return [param for param in command.params if param.param_type_name == "option"]


def failure_output(result) -> str:
    """Return stderr of a run that must fail cleanly, after checking that it did."""
    stderr = result.stderr.decode()
    assert result.returncode != 0, stderr
    assert "Traceback" not in stderr
    assert "Traceback" not in result.stdout.decode()
    return stderr


# Version and help.


def test_version_printed(evp):
    result = evp.run("--version")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"evp {__version__}"


def test_help_lists_commands(evp, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = evp.run("--help")
    assert result.returncode == 0
    output = result.stdout.decode()
    for name in COMMANDS:
        assert f" {name} " in output


@pytest.mark.parametrize("command_name", COMMANDS)
def test_help_describes_options(evp, monkeypatch, command_name):
    monkeypatch.setenv("COLUMNS", "200")
    result = evp.run(command_name, "--help")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    for option in options_of(command_name):
        name = max(option.opts, key=len)
        assert option.help, f"{command_name} {name} has no help text"
        matching = [line for line in lines if f" {name} " in line]
        assert matching, f"{command_name} --help does not list {name}"
        assert option.help[:25] in matching[0]


# Invalid input.


@pytest.mark.parametrize(
    "args",
    [
        ("publish", "--count", "1"),
        ("stats", "--once", "--json"),
    ],
    ids=["publish", "stats"],
)
def test_queue_address_invalid(evp, args):
    stderr = failure_output(evp.run(*args, "--queue", "nohost", timeout_s=RUN_TIMEOUT_S))
    assert "invalid queue address 'nohost'" in stderr


@pytest.mark.parametrize(
    "args",
    [
        ("publish", "--count", "1"),
        ("stats", "--once", "--json"),
    ],
    ids=["publish", "stats"],
)
def test_queue_unreachable(evp, args):
    stderr = failure_output(evp.run(*args, "--queue", UNREACHABLE, timeout_s=RUN_TIMEOUT_S))
    assert f"cannot connect to the queue at {UNREACHABLE}" in stderr


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        ("nosuch:fn", "cannot import handler module 'nosuch'"),
        ("os:nosuch", "module 'os' has no attribute 'nosuch'"),
        ("os", "invalid handler 'os'"),
        ("os:sep", "handler 'os:sep' is a str, not a function"),
        ("nosuch.py:fn", "handler file 'nosuch.py' not found"),
    ],
)
def test_handler_invalid(evp, handler, message):
    result = evp.run(
        "process", "--queue", UNREACHABLE, "--handler", handler, timeout_s=RUN_TIMEOUT_S
    )
    assert message in failure_output(result)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def fn(:\n", "SyntaxError"),
        ("raise RuntimeError('broken at import')\n", "broken at import"),
    ],
    ids=["syntax-error", "import-error"],
)
def test_handler_module_broken(evp, tmp_path, source, message):
    module = tmp_path / "broken_handler.py"
    module.write_text(source)
    result = evp.run(
        "process", "--queue", UNREACHABLE, "--handler", f"{module}:fn", timeout_s=RUN_TIMEOUT_S
    )
    stderr = failure_output(result)
    assert result.returncode == 2
    assert message in stderr


def test_output_directory_unusable(evp, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"")
    try:
        result = evp.run(
            "process", "--queue", UNREACHABLE, "--shards", "1",
            "--output", str(not_a_directory / "out"),
            timeout_s=10,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("evp process kept running with an --output path under a regular file")
    stderr = failure_output(result)
    assert str(not_a_directory / "out") in stderr


def test_publish_file_missing(evp, tmp_path):
    missing = tmp_path / "missing.jsonl"
    result = evp.run("publish", "--queue", UNREACHABLE, "--file", str(missing))
    assert f"input file {str(missing)!r} not found" in failure_output(result)


@pytest.mark.parametrize("command_name", ["publish", "process"])
def test_topic_name_invalid(evp, command_name):
    result = evp.run(
        command_name, "--queue", UNREACHABLE, "--topic", "bad name", timeout_s=RUN_TIMEOUT_S
    )
    assert "invalid topic name 'bad name'" in failure_output(result)


def test_key_field_invalid(evp):
    result = evp.run("publish", "--queue", UNREACHABLE, "--key-field", "a..b")
    assert "invalid key field 'a..b'" in failure_output(result)


def test_queue_port_in_use(evp, tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = evp.run(
            "queue", "--port", str(port), "--data-dir", str(tmp_path / "data"),
            timeout_s=RUN_TIMEOUT_S,
        )
    stderr = failure_output(result)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
    assert "address already in use" in stderr


def test_queue_data_dir_is_file(evp, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"")
    result = evp.run(
        "queue", "--port", "0", "--data-dir", str(not_a_directory), timeout_s=RUN_TIMEOUT_S
    )
    stderr = failure_output(result)
    assert result.returncode == 2
    assert f"cannot create data directory {not_a_directory}" in stderr


def test_fsync_policy_invalid(evp, tmp_path):
    result = evp.run(
        "queue", "--port", "0", "--fsync", "sometimes", "--data-dir", str(tmp_path / "data"),
        timeout_s=RUN_TIMEOUT_S,
    )
    stderr = failure_output(result)
    assert result.returncode == 2
    assert "'sometimes'" in stderr
    assert "--fsync" in stderr


# EVP_ environment variables.


def test_stats_reads_evp_queue(evp, tmp_path, monkeypatch):
    _, address = evp.queue(tmp_path / "data")
    monkeypatch.setenv("EVP_QUEUE", address)
    result = evp.run("stats", "--json", "--once", timeout_s=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr.decode()
    stats = orjson.loads(result.stdout)
    assert stats["version"] == __version__


def test_stats_rejects_bad_evp_queue(evp, monkeypatch):
    monkeypatch.setenv("EVP_QUEUE", "nohost")
    result = evp.run("stats", "--json", "--once", timeout_s=RUN_TIMEOUT_S)
    assert "invalid queue address 'nohost'" in failure_output(result)


def test_publish_reads_evp_variables(evp, tmp_path, monkeypatch):
    _, address = evp.queue(tmp_path / "data")
    monkeypatch.setenv("EVP_QUEUE", address)
    monkeypatch.setenv("EVP_TOPIC", "from-env")
    monkeypatch.setenv("EVP_COUNT", "25")
    monkeypatch.setenv("EVP_RATE", "0")
    result = evp.run("publish", timeout_s=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr.decode()
    topics = {topic["name"]: topic["events"] for topic in snapshot(address)["topics"]}
    assert topics == {"from-env": 25}


def test_option_overrides_environment(evp, tmp_path, monkeypatch):
    _, address = evp.queue(tmp_path / "data")
    monkeypatch.setenv("EVP_QUEUE", "nohost")
    result = evp.run("stats", "--json", "--once", "--queue", address, timeout_s=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr.decode()


def test_fsync_from_environment_invalid(evp, tmp_path, monkeypatch):
    monkeypatch.setenv("EVP_FSYNC", "sometimes")
    result = evp.run(
        "queue", "--port", "0", "--data-dir", str(tmp_path / "data"), timeout_s=RUN_TIMEOUT_S
    )
    stderr = failure_output(result)
    assert "EVP_FSYNC" in stderr


def test_handler_from_environment_checked(evp, monkeypatch):
    monkeypatch.setenv("EVP_HANDLER", "os:nosuch")
    result = evp.run("process", "--queue", UNREACHABLE, timeout_s=RUN_TIMEOUT_S)
    assert "module 'os' has no attribute 'nosuch'" in failure_output(result)


def test_queue_reads_evp_variables(evp, tmp_path, monkeypatch):
    data_dir = tmp_path / "env-data"
    port = free_port()
    monkeypatch.setenv("EVP_DATA_DIR", str(data_dir))
    monkeypatch.setenv("EVP_PORT", str(port))
    monkeypatch.setenv("EVP_PARTITIONS", "3")
    process = evp.start("queue", log_name="queue")
    wait_for_port(port, process)
    address = f"127.0.0.1:{port}"
    result = evp.run("publish", "--queue", address, "--count", "5", "--rate", "0")
    assert result.returncode == 0, result.stderr.decode()
    topics = snapshot(address)["topics"]
    assert [topic["partitions"] for topic in topics] == [3]
    assert (data_dir / "topics" / "events" / "topic.json").is_file()
