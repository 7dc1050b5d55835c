"""The malicious cloud (`cloud-server --hijack fsha`) and the edge's detector (`--detect splitguard`):
the hijacker's reconstructions of the private training images improve as it moves the encoder,
the detector stops a run against it (exit 3, one line, session closed) and stays quiet against an
honest server, and the settings refuse bad values naming their field or flag."""

import json
import math
import pickle
from dataclasses import replace

import grpc
import pytest
import torch

from attacks import harness
from cloud_server import cli as cloud_cli
from cloud_server.config import ServerConfig
from cloud_server.hijack import HijackJob, public_images
from cloud_server.local import LocalCloud
from deploy.processes import start_server
from edge_client import cli as edge_cli
from edge_client.config import DetectConfig, EdgeConfig
from edge_client.detect import HijackDetected, _Running, label_alignment, splitguard_score
from edge_client.trainer import run
from splitnet import data
from splitnet.models import OptimSpec, SplitSpec
from splitnet.settings import DataSpec, InvalidSetting
from splitnet.v1 import split_pb2 as pb
from splitnet.v1 import split_pb2_grpc


@pytest.mark.parametrize("fields,field", [
    ({"hijack": "evil"}, "hijack"),
    ({"hijack": "fsha"}, "public_data"),  # the attack needs its own images
    ({"hijack": "fsha", "public_data": "digits", "public_split": "val"}, "public_split"),
    ({"hijack": "fsha", "public_data": "digits", "hijack_record_every": 0}, "hijack_record_every"),
    ({"hijack": "fsha", "public_data": "digits", "checkpoint_dir": "ckpt"}, "checkpoint_dir"),
])
def test_server_hijack_settings_name_the_field(fields, field):
    with pytest.raises(InvalidSetting) as err:
        ServerConfig(**fields)
    assert err.value.field == field and f"ServerConfig.{field}" in str(err.value)


@pytest.mark.parametrize("fields,field", [
    ({"detect": "magic"}, "detect"), ({"detect_fake_rate": 0.0}, "detect_fake_rate"),
    ({"detect_threshold": 1.5}, "detect_threshold"), ({"detect_every": 0}, "detect_every"),
    ({"detect_min_fakes": 0}, "detect_min_fakes"), ({"detect_start": -1}, "detect_start"),
])
def test_detector_settings_name_the_field(fields, field):
    with pytest.raises(InvalidSetting) as err:
        DetectConfig(**fields)
    assert err.value.field == field


def test_the_command_lines_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        cloud_cli.parse_args(["--hijack", "fsha"])
    assert "--public-data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        edge_cli.main(["--detect", "splitguard", "--detect-threshold", "2"])
    assert "--detect-threshold must be in (0, 1)" in capsys.readouterr().err


def _running(vectors: torch.Tensor) -> _Running:
    r = _Running()
    for v in vectors:
        r.add(v)
    return r


def test_splitguard_score_separates_label_dependent_gradients():
    """Fake batches' gradients drawn like the real ones (a hijacker) score low; larger ones pointing
    elsewhere (an honest cloud facing wrong labels) score near 1."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, generator=g)
    real = base + 0.3 * torch.randn(40, 200, generator=g)
    r1, r2 = _running(real[::2]), _running(real[1::2])
    alike = _running(base + 0.3 * torch.randn(8, 200, generator=g))
    other = _running(3 * torch.randn(8, 200, generator=g))
    assert splitguard_score(alike, r1, r2) < 0.4
    assert splitguard_score(other, r1, r2) > 0.95


def test_label_alignment_is_high_for_label_driven_gradients():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(32) % 4
    directions = torch.randn(4, 2, 4, 4, generator=g)
    by_label = directions[labels] + 0.2 * torch.randn(32, 2, 4, 4, generator=g)
    unrelated = torch.randn(32, 2, 4, 4, generator=g)
    assert label_alignment(by_label, labels) > 0.7
    assert abs(label_alignment(unrelated, labels)) < 0.1


def _edge(server: str, report, *flags: str) -> int:
    return edge_cli.main(["--server", server, "--report", str(report), "--no-progress", "--epochs", "2",
                          "--deadline", "60", "--reconnect-seconds", "5", *flags])


@pytest.mark.slow
def test_a_hijacking_server_reconstructs_and_the_detector_stops_it(tmp_path, capsys, ray_local):
    """One real hijacking server: an edge without the detector is hijacked (the attacker's SSIM on its
    private training images rises from noise to a recognisable picture in 30 steps), and the same
    edge with either detector stops with exit 3, one line, and its session closed; under split-ray
    every virtual client's detector stops it, each reported as detected (not failed, not run again)."""
    recon = tmp_path / "recon"
    server = start_server("--hijack", "fsha", "--public-data", "digits", "--hijack-out", str(recon),
                          "--hijack-record-every", "10", "--threads", "1")
    try:
        assert _edge(server.address, tmp_path / "plain.json", "--max-steps", "30", "--job", "plain") == 0
        report = json.loads((tmp_path / "plain.json").read_text())
        pairs = harness.align(harness.read_reconstructions(recon),
                              harness.by_session_id([harness.PrivateSession(report, data.load(DataSpec()))]))
        by_step = {row["step_id"]: row["ssim"] for row in harness.score_pairs(pairs, "fsha", by_step=True)
                   ["train_by_step"]}
        assert sorted(by_step) == [1, 10, 20, 30]
        assert by_step[1] < 0.2 and by_step[30] > 0.6 and by_step[30] > by_step[10]  # measured: 0.03, 0.34, 0.75
        capsys.readouterr()

        code = _edge(server.address, tmp_path / "guarded.json", "--job", "guarded", "--detect", "splitguard")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == edge_cli.HIJACK_EXIT
        assert err[-1].startswith("edge-client: stopped: hijacking suspected at step")
        guarded = json.loads((tmp_path / "guarded.json").read_text())
        assert guarded["detected"] and guarded["detect"]["detected_at_step"] == guarded["steps"] < 46
        assert guarded["detect"]["last_splitguard"] < DetectConfig.detect_threshold
        capsys.readouterr()
        assert _edge(server.address, tmp_path / "aligned.json", "--job", "aligned", "--detect", "alignment") == 3
        assert "label alignment" in capsys.readouterr().err.strip().splitlines()[-1]
        aligned = json.loads((tmp_path / "aligned.json").read_text())
        # at its first check (--detect-start), with no fake batch sent
        detect = aligned["detect"]
        assert detect["detected_at_step"] == DetectConfig.detect_start and detect["fake_steps"] == 0
        with grpc.insecure_channel(server.address) as channel:
            stats = split_pb2_grpc.SplitLearningStub(channel).Stats(pb.StatsRequest(job="guarded"), timeout=10)
        assert [(j.job, j.sessions_open) for j in stats.jobs] == [("guarded", 0)]  # closed on the way out

        from deploy.sim.config import RayRunConfig, VirtualClients
        from deploy.sim.run import run_clients
        from ray_cluster import edge

        config = replace(edge(server, "ray-guarded", epochs=2), detect=DetectConfig("alignment"))
        ray_report = run_clients(RayRunConfig(config, clients=3, mode="parallel", virtual=VirtualClients(2)))
        clients = ray_report["client_reports"]
        assert ray_report["detected"] == [c["client_id"] for c in clients] and not ray_report["failed"]
        assert all(c["status"] == "detected" and c["detected_at_step"] == DetectConfig.detect_start
                   and "HijackDetected: hijacking suspected" in c["error"] for c in clients)
    finally:
        server.stop()


def test_a_detection_crosses_processes_whole():
    """A Ray actor's HijackDetected reaches the driver pickled: reason, figures and report intact."""
    err = HijackDetected("hijacking suspected at step 12", {"detected_at_step": 12})
    err.report["steps"] = 12
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.detection, back.report) == (err.reason, err.detection, err.report)


def test_the_detector_stays_quiet_against_an_honest_server(server, tmp_path):
    code = _edge(server.address, tmp_path / "honest.json", "--job", "honest-detect", "--detect", "splitguard",
                 "--max-steps", "40")
    report = json.loads((tmp_path / "honest.json").read_text())
    assert code == 0 and not report["detect"]["detected"]
    checks = report["detect"]["checks"]
    assert checks and min(c["splitguard"] for c in checks) > 0.9  # measured: 0.999 and up
    assert report["detect"]["last_label_alignment"] > 0.3  # a hijacker's stays near 0.05
    assert math.isfinite(report["test_accuracy"]) and "splitguard" in report["history"][-1]


def test_the_python_api_raises_with_the_report_so_far():
    """In-process (the real job behind `LocalCloud`): `run` raises HijackDetected carrying the report up
    to the stop, which the harness can align like any edge report."""
    spec = SplitSpec("cnn", "", 10, (1, 16, 16))
    job = HijackJob("api", spec, OptimSpec(0.05, 0.9, 5e-4), public=public_images(DataSpec(), "test"))
    config = EdgeConfig(detect=DetectConfig("alignment"), job="api", progress=False)
    with pytest.raises(HijackDetected) as err:
        run(config, LocalCloud(job))
    report = err.value.report
    assert report["detected"] and report["steps"] == DetectConfig.detect_start == job.last_step(report["client_id"])
    assert report["reason"] == str(err.value) and math.isnan(report["test_accuracy"])  # no evaluation
