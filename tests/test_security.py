"""TLS, mutual TLS, bearer tokens, session ownership, the CLIs' security flags, and
checkpoints that refuse pickled objects. Certificates are made at test time."""

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from attacks.proxy import Proxy, RawForwarder
from cloud_server import cli as cloud_cli
from cloud_server.checkpoints import Checkpointer
from cloud_server.config import ServerConfig
from cloud_server.server import CloudServer
from deploy.processes import start_server
from edge_client import cli as edge_cli
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import CloudError, RemoteCloud
from edge_client.trainer import run
from splitnet import capture, checkpoint_file, codec, security, wire
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc

from certs import make_cert, write_cert
from messages import rejected, spec, step, tensor

TOKEN_A, TOKEN_B = "token-a-0123456789abcdef", "token-b-0123456789abcdef"


# -- certificates


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca, server (localhost / 127.0.0.1), named (only 'cloud.internal'), clients edge-1 and edge-2,
    and rogue: a client certificate from another CA."""
    folder = tmp_path_factory.mktemp("pki")
    for ca_name in ("ca", "other-ca"):
        ca_cert, ca_key = make_cert(ca_name, None, ca_name, ca=True)
        write_cert(folder, ca_name, ca_cert, ca_key)
        if ca_name == "ca":
            server_sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            for name, sans in (("server", server_sans), ("named", [x509.DNSName("cloud.internal")])):
                write_cert(folder, name,
                           *make_cert(name, ca_key, ca_name, sans=sans, usage=ExtendedKeyUsageOID.SERVER_AUTH))
            for name in ("edge-1", "edge-2"):
                write_cert(folder, name, *make_cert(name, ca_key, ca_name, usage=ExtendedKeyUsageOID.CLIENT_AUTH))
        else:
            write_cert(folder, "rogue", *make_cert("edge-1", ca_key, ca_name, usage=ExtendedKeyUsageOID.CLIENT_AUTH))
    return folder


def _files(pki: Path, cert: str = "", ca: str = "ca") -> dict:
    return {"tls_ca": str(pki / f"{ca}.pem") if ca else "", "tls_cert": str(pki / f"{cert}.pem") if cert else "",
            "tls_key": str(pki / f"{cert}.key") if cert else ""}


@pytest.fixture
def serve():
    servers = []

    def start(**kw) -> str:
        server = CloudServer(ServerConfig(**{"port": 0, "grace_seconds": 0.5, **kw}))
        servers.append(server)
        return f"127.0.0.1:{server.start()}"

    yield start
    for server in servers:
        server.stop()


def _stub(address: str, **kw) -> split_pb2_grpc.SplitLearningStub:
    return split_pb2_grpc.SplitLearningStub(security.open_channel(address, [], **kw))


def _train(address: str, job: str, **conn) -> dict:
    config = EdgeConfig(connection=ConnectionConfig(server=address, deadline_s=10, reconnect_s=10, **conn),
                        job=job, epochs=1, max_steps=3, progress=False)
    return run(config, RemoteCloud(config.connection))


# -- TLS


def test_tls_trains_and_refuses_plaintext_and_strangers(pki, serve):
    address = serve(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    assert _train(address, "tls", **_files(pki))["steps"] == 3
    assert rejected(lambda: _stub(address).Stats(pb.StatsRequest(), timeout=5)).code() == grpc.StatusCode.UNAVAILABLE
    wrong_ca = _stub(address, **_files(pki, ca="other-ca"))
    assert rejected(lambda: wrong_ca.Stats(pb.StatsRequest(), timeout=5)).code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.slow
def test_a_tls_mismatch_is_named_in_the_edge_error(pki, serve, capsys):
    """A plaintext edge against a TLS server and a TLS edge against a plaintext one each get an
    error that points at TLS, not just UNAVAILABLE."""
    edge = ["--epochs", "1", "--max-steps", "1", "--no-progress", "--deadline", "2", "--reconnect-seconds", "1",
            "--connect-seconds", "1"]
    tls_server = serve(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    assert edge_cli.main(["--server", tls_server, *edge]) == 1
    assert "if it serves TLS, connect with --tls-ca" in capsys.readouterr().err.strip().splitlines()[-1]
    plain_server = serve()
    assert edge_cli.main(["--server", plain_server, "--tls-ca", str(pki / "ca.pem"), *edge]) == 1
    assert "TLS handshake with" in capsys.readouterr().err.strip().splitlines()[-1]


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki, serve):
    address = serve(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), tls_ca=str(pki / "ca.pem"))
    for files in (_files(pki), _files(pki, cert="rogue")):
        assert rejected(lambda: _stub(address, **files).Stats(pb.StatsRequest(), timeout=5)).code() == \
            grpc.StatusCode.UNAVAILABLE
    assert _train(address, "mtls", **_files(pki, cert="edge-1"))["steps"] == 3
    # the certificate is the identity: edge-2 cannot drive or take over edge-1's client
    one, two = _stub(address, **_files(pki, cert="edge-1")), _stub(address, **_files(pki, cert="edge-2"))
    sid = one.OpenSession(spec("owned"), timeout=10).session_id
    assert rejected(lambda: list(two.Train(iter([step(sid)]), timeout=10))).code() == grpc.StatusCode.PERMISSION_DENIED
    assert rejected(lambda: two.OpenSession(spec("owned"), timeout=10)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert rejected(lambda: two.Flush(pb.FlushRequest(session_id=sid), timeout=10)).code() == \
        grpc.StatusCode.PERMISSION_DENIED
    assert list(one.Train(iter([step(sid)]), timeout=10))[0].step_id == 1


def test_tls_server_name_through_a_forwarder_hides_the_features(pki, serve, tmp_path):
    """A TLS edge pointed at the attacker's raw TCP relay (`attacker proxy --raw`) verifies the
    server by --tls-server-name, and the relay records no feature bytes; without TLS it does."""
    tls = serve(tls_cert=str(pki / "named.pem"), tls_key=str(pki / "named.key"))
    plain = serve()
    marker = codec.encode(torch.full((1,), 1234.5678)).data * 4  # 16 bytes of a value features never hold
    for backend, files, visible in ((tls, {**_files(pki), "tls_server_name": "cloud.internal"}, False),
                                    (plain, {}, True)):
        relay = RawForwarder("127.0.0.1:0", backend, str(tmp_path / f"raw-{visible}")).start()
        try:
            stub = _stub(relay.address, **files)
            sid = stub.OpenSession(spec("proxied"), timeout=10).session_id
            assert list(stub.Train(iter([step(sid, features=tensor(2, fill=1234.5678))]), timeout=10))[0].step_id == 1
        finally:
            relay.stop()
        assert (marker in relay.recorded()) is visible
    relay = RawForwarder("127.0.0.1:0", tls, str(tmp_path / "raw-noname")).start()
    try:  # without the name override the certificate does not match
        stub = _stub(relay.address, **_files(pki))
        assert rejected(lambda: stub.Stats(pb.StatsRequest(), timeout=5)).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        relay.stop()
    assert _train(tls, "named", **_files(pki), tls_server_name="cloud.internal")["steps"] == 3


def test_grpc_proxy_captures_nothing_under_tls(pki, serve, tmp_path):
    """The gRPC-level attacker proxy holds no key: a TLS edge cannot be made to talk to it."""
    tls = serve(tls_cert=str(pki / "named.pem"), tls_key=str(pki / "named.key"))
    proxy = Proxy("127.0.0.1:0", tls, str(tmp_path / "cap")).start()
    try:
        stub = _stub(proxy.address, **_files(pki), tls_server_name="cloud.internal")
        assert rejected(lambda: stub.OpenSession(spec("eaves"), timeout=5)).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proxy.stop()
    assert not (tmp_path / "cap" / "records.jsonl").exists() and capture.read_sessions(tmp_path / "cap") == []


# -- tokens and ownership


def test_tokens_guard_the_service_but_not_health(serve):
    address = serve(auth_tokens=(TOKEN_A, TOKEN_B))
    for stub in (_stub(address), _stub(address, auth_token="x" * 16 + "-not-accepted")):
        for call in (lambda: stub.OpenSession(spec("j"), timeout=5), lambda: stub.Stats(pb.StatsRequest(), timeout=5),
                     lambda: list(stub.Train(iter([step("s")]), timeout=5)),
                     lambda: list(stub.Infer(iter([pb.InferRequest()]), timeout=5))):
            assert rejected(call).code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(address) as channel:  # health and reflection stay open (see docs/SECURITY.md)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        assert wire.SERVICE_NAME in {s.name for r in replies for s in r.list_services_response.service}
    assert _train(address, "token", auth_token=TOKEN_A)["steps"] == 3
    with pytest.raises(CloudError, match="UNAUTHENTICATED"):
        _train(address, "token", auth_token="wrong-token-0123456789")


def test_a_session_is_driven_only_by_the_token_that_opened_it(serve):
    address = serve(auth_tokens=(TOKEN_A, TOKEN_B))
    a, b = _stub(address, auth_token=TOKEN_A), _stub(address, auth_token=TOKEN_B)
    sid = a.OpenSession(spec("shared", "alice"), timeout=10).session_id
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert rejected(lambda: list(b.Train(iter([step(sid)]), timeout=10))).code() == denied
    assert rejected(lambda: list(b.Infer(iter([pb.InferRequest(session_id=sid)]), timeout=10))).code() == denied
    assert rejected(lambda: b.CloseSession(pb.CloseRequest(session_id=sid), timeout=10)).code() == denied
    assert rejected(lambda: b.OpenSession(spec("shared", "alice"), timeout=10)).code() == denied  # no take-over by re-open
    bob = b.OpenSession(spec("shared", "bob"), timeout=10).session_id  # its own client in the same job is fine
    assert list(b.Train(iter([step(bob)]), timeout=10))[0].step_id == 1
    assert list(a.Train(iter([step(sid)]), timeout=10))[0].step_id == 1
    stats = a.Stats(pb.StatsRequest(job="shared"), timeout=10)
    assert dict(stats.jobs[0].client_last_step) == {"alice": 1, "bob": 1} and stats.steps_rejected == 1


def test_ownership_survives_a_restart(tmp_path):
    """The owner of a client id is checkpointed: after a restart another principal still cannot
    re-open it and take over its step counter; the owner carries on."""
    config = ServerConfig(port=0, grace_seconds=0.5, auth_tokens=(TOKEN_A, TOKEN_B), checkpoint_dir=str(tmp_path))
    first = CloudServer(config)
    address = f"127.0.0.1:{first.start()}"
    a = _stub(address, auth_token=TOKEN_A)
    sid = a.OpenSession(spec("kept", "alice"), timeout=10).session_id
    assert list(a.Train(iter([step(sid)]), timeout=10))[0].step_id == 1
    first.stop()  # checkpoints every job
    second = CloudServer(config)
    address = f"127.0.0.1:{second.start()}"
    try:
        b = _stub(address, auth_token=TOKEN_B)
        error = rejected(lambda: b.OpenSession(spec("kept", "alice"), timeout=10))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "client_id" in error.details()
        again = _stub(address, auth_token=TOKEN_A).OpenSession(spec("kept", "alice"), timeout=10)
        assert again.resumed and again.last_step_id == 1
    finally:
        second.stop()


# -- the command lines


@pytest.mark.slow
def test_cli_mutual_tls_and_token_end_to_end(pki):
    """Both real processes, all security flags; the token comes from the environment."""
    env = {security.AUTH_ENV: TOKEN_A}
    server = start_server("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                          "--tls-ca", str(pki / "ca.pem"), env=env)
    try:
        edge = ["--server", server.address, "--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "edge-1.pem"),
                "--tls-key", str(pki / "edge-1.key"), "--max-steps", "2", "--epochs", "1", "--no-progress",
                "--deadline", "10", "--reconnect-seconds", "5"]
        done = subprocess.run([sys.executable, "-m", "edge_client", *edge], capture_output=True, text=True,
                              timeout=300, env={**os.environ, **env})
        assert done.returncode == 0, done.stderr
        assert TOKEN_A not in done.stdout + done.stderr
    finally:
        server.stop()
    assert TOKEN_A not in server.output()


@pytest.mark.parametrize("module,args,flag", [
    ("cloud_server", ["--tls-cert", "{pki}/missing.pem", "--tls-key", "{pki}/server.key"], "--tls-cert"),
    ("cloud_server", ["--tls-cert", "{pki}/server.pem", "--tls-key", "{pki}/server.pem"], "--tls-key"),
    ("cloud_server", ["--tls-ca", "{pki}/ca.pem"], "--tls-cert"),
    ("cloud_server", ["--auth-token", "short"], "--auth-token"),
    ("edge_client", ["--tls-ca", "{pki}/missing.pem"], "--tls-ca"),
    ("edge_client", ["--tls-ca", "{pki}/edge-1.key"], "--tls-ca"),  # PEM, but not a certificate
    ("edge_client", ["--tls-cert", "{pki}/edge-1.pem"], "--tls-key"),
    ("edge_client", ["--tls-server-name", "cloud.internal"], "--tls-server-name"),
])
def test_cli_security_errors_name_the_flag(pki, module, args, flag, capsys):
    """In-process: a bad flag must fail before anything is served or sent."""
    main = cloud_cli.main if module == "cloud_server" else edge_cli.main
    args = [a.format(pki=pki) for a in args]
    try:
        code = main([*(["--port", "0"] if module == "cloud_server" else []), *args])
    except SystemExit as exit_:  # argparse's error exit
        code = exit_.code
    assert code == 2 and flag in capsys.readouterr().err.strip().splitlines()[-1]


class _Exploit:
    """What a hostile checkpoint carries: unpickling it would run `open(marker, 'w')`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path, capsys):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "pwned"
    ckpt.mkdir()
    # in a well-formed file: the checksum is no defence against whoever can write the folder
    (ckpt / "evil-00000000.ckpt").write_bytes(checkpoint_file.encode({"name": "evil", "decoder": {},
                                                                  "payload": _Exploit(marker)}))
    with pytest.raises(ValueError, match="evil-00000000.ckpt: holds objects"):
        Checkpointer(str(ckpt), 10).check_all("cpu")
    assert cloud_cli.main(["--port", "0", "--checkpoint-dir", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_security_helpers():
    assert security.presented_token([("authorization", "Bearer abc")]) == "abc"
    assert security.presented_token([("authorization", "Basic abc")]) == ""
    assert security.token_matches(TOKEN_B, (TOKEN_A, TOKEN_B)) and not security.token_matches("", (TOKEN_A,))
    assert security.principal({"x509_common_name": [b"edge-1"]}, TOKEN_A) == \
        f"cert:edge-1,token:{security.token_fingerprint(TOKEN_A)}"
    assert security.principal({}, "") == ""
    assert TOKEN_A not in repr(ConnectionConfig(auth_token=TOKEN_A)) + repr(ServerConfig(auth_tokens=(TOKEN_A,)))
    with pytest.raises(ValueError, match="printable"):
        security.check_token("token with spaces inside")
