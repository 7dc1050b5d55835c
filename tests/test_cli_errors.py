"""Errors a user can act on: ports that are taken or out of range, servers that are not
there or speak TLS, and flag values the CLIs refuse by their own name. Each must be one
line on stderr, without a traceback."""

import socket
import subprocess
import sys
import time

import pytest

from attacks import cli as attacker_cli
from attacks.proxy import Proxy, RawForwarder
from cloud_server import cli as cloud_cli
from edge_client import cli as edge_cli
from splitnet import wire

from messages import free_port


def _one_line_error(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err, err
    assert all(n in lines[-1] for n in needles), err
    return lines[-1]


def _exit_code(main, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's error exit
        return exit_.code


@pytest.mark.slow
def test_a_second_server_on_a_port_in_use_exits_with_one_line(server):
    """gRPC's default SO_REUSEPORT let a second server bind the same port and silently take
    a share of the connections; now the second one exits at once, naming the port. The first
    is the worker's server (conftest.py): no other test of the worker runs meanwhile."""
    port = server.address.rsplit(":", 1)[1]
    second = subprocess.Popen([sys.executable, "-m", "cloud_server", "--port", port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        out, err = second.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        second.kill()
        out, err = second.communicate()
        pytest.fail(f"a second server on port {port} kept running: {out}")
    assert second.returncode != 0 and "listening" not in out
    _one_line_error(err, f"127.0.0.1:{port}", "in use", "--port")


def test_an_ipv6_address_is_listened_on_and_its_port_in_use_named():
    """`--host ::1` (any IPv6 host) was refused before gRPC saw it ("Address family for hostname not
    supported"): the port probe opened an IPv4 socket whatever the host."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    taken = wire.listening_socket("::1", 0, "--port")
    try:
        assert taken.family == socket.AF_INET6
        with pytest.raises(OSError, match=r"::1:\d+: the port is in use \(pass another --port\)"):
            wire.listening_socket("::1", taken.getsockname()[1], "--port")
    finally:
        taken.close()


def test_proxies_do_not_share_a_port_in_use(tmp_path, capsys):
    taken = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    try:
        with pytest.raises(OSError, match="in use.*--listen"):
            Proxy(address, "127.0.0.1:1", None)
        with pytest.raises(OSError, match="in use.*--listen"):
            RawForwarder(address, "127.0.0.1:1", str(tmp_path))
        assert attacker_cli.main(["proxy", "--listen", address, "--upstream", "127.0.0.1:1"]) == 2
        _one_line_error(capsys.readouterr().err, address, "in use")
    finally:
        taken.close()
    relay = RawForwarder("127.0.0.1:0", "127.0.0.1:1", str(tmp_path))
    try:
        assert relay.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        with pytest.raises(OSError, match="in use"):
            RawForwarder(relay.address, "127.0.0.1:1", str(tmp_path))
    finally:
        relay.stop()


@pytest.mark.parametrize("main,argv,flag", [
    (cloud_cli.main, ["--port", "70000"], "--port"),
    (cloud_cli.main, ["--port", "-1"], "--port"),
    (attacker_cli.main, ["proxy", "--listen", "127.0.0.1:65536", "--upstream", "127.0.0.1:1"], "--listen"),
    (attacker_cli.main, ["proxy", "--listen", "no-port", "--upstream", "127.0.0.1:1"], "--listen"),
])
def test_out_of_range_ports_are_refused_by_argparse(main, argv, flag, capsys):
    started = time.monotonic()
    assert _exit_code(main, argv) == 2
    _one_line_error(capsys.readouterr().err, f"argument {flag}")
    assert time.monotonic() - started < 5  # refused before anything is served


# a long --reconnect-seconds: the first connection must give up after --connect-seconds, which
# is what a user with a wrong --server waits for (it used to be the mid-run reconnect window)
EDGE = ["--epochs", "1", "--max-steps", "1", "--no-progress", "--deadline", "2", "--connect-seconds", "1",
        "--reconnect-seconds", "600"]


def test_an_edge_pointed_at_nothing_says_so_in_bounded_time(capsys):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert edge_cli.main(["--server", address, *EDGE]) == 1
    # --connect-seconds 1, not --reconnect-seconds 600; the margin is torch's import and the
    # model build, which take tens of seconds on a loaded 2-core machine
    assert time.monotonic() - started < 120
    _one_line_error(capsys.readouterr().err, address, "is a cloud-server running there?", "gave up after",
                    "(--connect-seconds 1)")


@pytest.mark.parametrize("argv,flag", [
    (["--noise", "-1"], "--noise must be"),
    (["--lambda", "-1"], "--lambda must be"),
    (["--dropout", "1.5"], "--dropout must be"),
    (["--bottleneck", "-2"], "--bottleneck must be >= 0"),
    (["--cem", "gmm"], "pass --lambda"),
    (["--adv-weight", "-1"], "--adv-weight must be a finite number >= 0, got -1.0"),
    (["--adv-every", "0"], "--adv-every must be an int >= 1, got 0"),
    (["--prune-ratio", "1"], "--prune-ratio must be in [0, 1), got 1.0"),
    (["--cem", "slot", "--lambda", "0"], "pass --lambda"),
    (["--resume"], "--resume needs --state-dir"),
    (["--state-dir", "s", "--state-every", "17"], "--state-every must be 1..16"),
    (["--state-dir", "s", "--state-every", "0"], "--state-every must be 1..16"),
])
def test_edge_flag_errors_name_the_flag(argv, flag, capsys):
    assert _exit_code(edge_cli.main, [*argv, *EDGE]) == 2
    line = _one_line_error(capsys.readouterr().err, flag)
    assert "DefenseConfig" not in line


@pytest.mark.parametrize("argv,flag", [
    (["--job-memory-mb", "8192"], "--job-memory-mb must be > 0 and at most --max-memory-mb"),
    (["--job-memory-mb", "0"], "--job-memory-mb must be > 0"),
    (["--job-idle-seconds", "-1"], "--job-idle-seconds must be >= 0"),
])
def test_server_budget_flag_errors_name_the_flag(argv, flag, capsys):
    assert _exit_code(cloud_cli.main, ["--port", "0", *argv]) == 2
    _one_line_error(capsys.readouterr().err, flag)
