"""The attacker service end to end on loopback: proxy and tap capture real traffic,
`attacker run` inverts it, `attacker score` aligns it with the private images."""

import dataclasses
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from attacks import harness
from attacks.cli import build_parser
from attacks.cli import main as attacker_main
from attacks.config import AttackConfig
from attacks.runner import Attacker, load_encoder
from deploy.processes import start_server
from edge_client.config import ConnectionConfig, EdgeConfig
from edge_client.remote import RemoteCloud
from edge_client.trainer import run
from splitnet import capture, data


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    cap = tmp_path_factory.mktemp("capture")
    proc = subprocess.Popen([sys.executable, "-m", "attacks", "proxy", "--listen", "127.0.0.1:0", "--upstream",
                             server.address, "--capture", str(cap)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"listening on (\S+) ->", line)
    assert match, line
    yield match.group(1), cap
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def attacked(server, proxy, tmp_path_factory):
    """An edge trains and serves through the proxy; the same run goes direct for comparison."""
    address, cap = proxy
    out = tmp_path_factory.mktemp("edge")
    base = EdgeConfig(epochs=3, progress=False, save_encoder=str(out / "enc.pt"))
    via = dataclasses.replace(base, job="via-proxy", connection=ConnectionConfig(server=address))
    direct = dataclasses.replace(base, job="direct", connection=ConnectionConfig(server=server.address),
                                 save_encoder="")  # the attacks load the proxied run's encoder
    report = run(via, RemoteCloud(via.connection))
    (out / "edge.json").write_text(json.dumps(report))
    return {"report": report, "direct": run(direct, RemoteCloud(direct.connection)), "cap": cap, "out": out}


@pytest.mark.slow
def test_proxy_is_transparent(attacked):
    via, direct = attacked["report"], attacked["direct"]
    assert via["train_loss"] == direct["train_loss"] and via["test_accuracy"] == direct["test_accuracy"]


def test_capture_holds_every_message_pickle_free(attacked):
    report, cap = attacked["report"], attacked["cap"]
    records = capture.read_records(cap)
    train = [r for r in records if r.method == "Train" and r.session_id == report["session_id"]]
    infer = [r for r in records if r.method == "Infer" and r.session_id == report["session_id"]]
    assert [r.step_id for r in train] == list(range(1, report["steps"] + 1))
    assert sum(r.shape[0] for r in infer) == 359 and all(len(r.labels) == r.shape[0] for r in train)
    sessions = {s["session_id"]: s for s in capture.read_sessions(cap)}
    assert sessions[report["session_id"]]["cut"] == "block1"
    assert sessions[report["session_id"]]["feature_shape"] == [32, 8, 8]


@pytest.mark.slow
def test_inversion_attack_reconstructs_digits(attacked, tmp_path):
    out, cap = attacked["out"], attacked["cap"]
    recon, result = tmp_path / "recon", tmp_path / "result"
    assert attacker_main(["run", "--capture", str(cap), "--method", "inversion", "--encoder", str(out / "enc.pt"),
                          "--epochs", "4", "--out", str(recon)]) == 0
    assert attacker_main(["score", "--recon", str(recon), "--edge-report", str(out / "edge.json"),
                          "--out", str(result)]) == 0
    scores = json.loads((result / "attack.json").read_text())
    assert scores["n_images"] == 359 and scores["method"] == "inversion"
    assert scores["ssim"] >= 0.7, scores  # 0.97 at 4 epochs
    assert (result / "recon.png").stat().st_size > 0

    # The same attack on features computed in-process scores exactly the same.
    encoder, spec, _ = load_encoder(str(out / "enc.pt"))
    splits = data.load(data.DataSpec())
    attacker = Attacker(AttackConfig("inversion", epochs=4, progress=False), spec, splits.train, encoder=encoder).fit()
    truth = torch.cat(harness.private_requests(splits.test, attacked["report"]["eval_batch_size"]))
    with torch.no_grad():
        local = harness.score(attacker.reconstruct(encoder(truth)), truth, "inversion")
    assert local["ssim"] == pytest.approx(scores["ssim"], abs=1e-6)
    assert local["mse"] == pytest.approx(scores["mse"], rel=1e-5)

    # Scored on a class-stratified sample: 10 of each class, the images of those indices.
    assert attacker_main(["score", "--recon", str(recon), "--edge-report", str(out / "edge.json"), "--per-class",
                          "10", "--grid", "20", "--out", str(tmp_path / "sampled")]) == 0
    sampled = json.loads((tmp_path / "sampled" / "attack.json").read_text())
    indices = data.stratified(data.labels(splits.test), 10)
    assert sampled["n_images"] == 100 and sampled["sample"]["per_class_images"] == [10] * 10
    with torch.no_grad():
        subset = harness.score(attacker.reconstruct(encoder(truth[indices])), truth[indices], "inversion")
    assert subset["mse"] == pytest.approx(sampled["mse"], rel=1e-5) and subset["mse"] != pytest.approx(local["mse"])


@pytest.mark.slow
@pytest.mark.parametrize("method,args", [("rmle", ["--rmle-iterations", "60", "--max-records", "1"]),
                                         ("shadow", ["--shadow-epochs", "2", "--epochs", "2"])])
def test_rmle_and_shadow_run_and_report(attacked, server_checkpoints, tmp_path, method, args):
    out, cap = attacked["out"], attacked["cap"]
    knowledge = ["--encoder", str(out / "enc.pt")]
    if method == "shadow":  # the curious cloud holds the decoder (its own checkpoint), not the encoder
        ckpt = next((p for p in sorted(server_checkpoints.glob("*.ckpt")) if "via-proxy" in p.name), None)
        assert ckpt is not None
        knowledge = ["--decoder", str(ckpt)]
    recon, result = tmp_path / "recon", tmp_path / "result"
    assert attacker_main(["run", "--capture", str(cap), "--method", method, *knowledge, "--aux-limit", "300",
                          *args, "--out", str(recon)]) == 0
    assert attacker_main(["score", "--recon", str(recon), "--edge-report", str(out / "edge.json"),
                          "--out", str(result)]) == 0
    scores = json.loads((result / "attack.json").read_text())
    # rMLE attacked only the first inference batch (--max-records 1): the scorer scores what was attacked
    assert scores["method"] == method and scores["n_images"] == (256 if method == "rmle" else 359)
    assert all(math.isfinite(scores[k]) for k in ("mse", "ssim", "psnr"))
    assert 0 < scores["ssim"] <= 1 and scores["mse"] > 0
    info = json.loads((recon / "run.json").read_text())  # what produced them, defaults resolved
    if method == "rmle":
        assert (info["rmle_iterations"], info["rmle_lr"], info["rmle_tv_weight"]) == (60, 1e-2, 0.05)
        assert "inverse_blocks" not in info
    else:  # digits: the light default network, two epochs as asked
        assert (info["shadow_epochs"], info["inverse_epochs"], info["inverse_blocks"], info["inverse_width"]) == \
            (2, 2, 2, 64)
        assert len(info["inverse_loss_history"]) == 2


def test_inverse_network_flags_and_their_old_names():
    parser = build_parser()
    base = ["run", "--capture", "c", "--out", "o"]
    new = parser.parse_args([*base, "--inverse-width", "8", "--inverse-epochs", "3", "--inverse-blocks", "4"])
    old = parser.parse_args([*base, "--width", "8", "--epochs", "3", "--inverse-blocks", "4"])
    assert vars(new) == vars(old) and (new.width, new.epochs, new.inverse_blocks) == (8, 3, 4)
    unset = parser.parse_args(base)  # left to AttackConfig.resolved, by the data
    assert (unset.width, unset.epochs, unset.inverse_blocks) == (None, None, None)


@pytest.mark.slow
def test_training_traffic_is_placed_and_scored_by_epoch(attacked, tmp_path):
    """The harness replays the edge's shuffled training order: every captured training step gets the
    private images it carried (their labels are the ones on the wire), and the scores come per epoch."""
    report, out, cap = attacked["report"], attacked["out"], attacked["cap"]
    splits = data.load(data.DataSpec())
    session = harness.PrivateSession(report, splits)
    labels = splits.train.tensors[1]
    train = [r for r in capture.read_records(cap) if r.method == "Train" and r.session_id == report["session_id"]]
    assert len(train) == report["steps"] == 3 * session.steps_per_epoch
    for record in train:
        assert labels[session.train_indices(record.step_id)].tolist() == list(record.labels), record.step_id
    assert session.train_indices(0) is None and session.train_indices(report["steps"] + 1) is None

    recon, result = tmp_path / "recon", tmp_path / "result"
    assert attacker_main(["run", "--capture", str(cap), "--method", "inversion", "--encoder", str(out / "enc.pt"),
                          "--epochs", "4", "--only", "Train", "--aux-split", "test", "--session", report["session_id"],
                          "--out", str(recon)]) == 0
    assert attacker_main(["score", "--recon", str(recon), "--edge-report", str(out / "edge.json"),
                          "--out", str(result)]) == 0
    scores = json.loads((result / "attack.json").read_text())
    assert list(scores["by_traffic"]) == ["Train"]
    assert scores["n_images"] == scores["by_traffic"]["Train"]["n_images"] == report["train_samples"]
    assert report["train_samples"] == 3 * len(splits.train)
    assert [e["epoch"] for e in scores["train_by_epoch"]] == [1, 2, 3]
    assert all(e["n_images"] == len(splits.train) for e in scores["train_by_epoch"])
    assert all(0.0 < e["ssim"] <= 1.0 and e["mse"] > 0 for e in scores["train_by_epoch"])


def test_scoring_an_attack_on_its_own_training_images_is_refused():
    pair = harness.Pair("Train", 1, torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="--aux-split test"):
        harness.check_aux_disjoint([pair], {"aux_dataset": "digits", "aux_split": "train"}, {"digits"})
    harness.check_aux_disjoint([pair], {"aux_dataset": "digits", "aux_split": "test"}, {"digits"})
    harness.check_aux_disjoint([pair], {"aux_dataset": "mnist", "aux_split": "train"}, {"digits"})
    with pytest.raises(ValueError, match="--aux-split train"):
        harness.check_aux_disjoint([dataclasses.replace(pair, method="Infer", epoch=0)],
                                   {"aux_dataset": "digits", "aux_split": "test"}, {"digits"})


def test_grouped_scores_equal_scoring_each_group_alone():
    g = torch.Generator().manual_seed(0)

    def pair(method, epoch, n):
        return harness.Pair(method, epoch, torch.rand(n, 1, 16, 16, generator=g), torch.rand(n, 1, 16, 16, generator=g))

    pairs = [pair("Infer", 0, 3), pair("Train", 1, 2), pair("Train", 2, 4), pair("Train", 1, 1)]
    result = harness.score_pairs(pairs, "inversion")

    def alone(group):
        scores = harness.score(torch.cat([p.recon for p in group]), torch.cat([p.truth for p in group]), "inversion")
        return {k: scores[k] for k in ("mse", "ssim", "psnr", "n_images")}

    def picked(entry):
        return {k: entry[k] for k in ("mse", "ssim", "psnr", "n_images")}

    assert picked(result) == pytest.approx(alone(pairs))
    assert picked(result["by_traffic"]["Infer"]) == pytest.approx(alone(pairs[:1]))
    assert picked(result["by_traffic"]["Train"]) == pytest.approx(alone(pairs[1:]))
    assert [e["epoch"] for e in result["train_by_epoch"]] == [1, 2]
    assert picked(result["train_by_epoch"][0]) == pytest.approx(alone([pairs[1], pairs[3]]))
    assert picked(result["train_by_epoch"][1]) == pytest.approx(alone([pairs[2]]))


def test_a_stratified_sample_takes_each_class_alike_and_is_fixed():
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)  # sorted by class, as an ImageFolder test split is
    sample = data.stratified(targets, 10)
    assert torch.bincount(targets[sample]).tolist() == [10, 10, 5]  # a class with fewer gives all it has
    assert torch.equal(sample, data.stratified(targets, 10)) and torch.equal(sample, sample.sort().values)
    assert not torch.equal(sample, data.stratified(targets, 10, seed=1))
    assert sample[:10].max() > 9  # drawn, not the first ten of the class
    splits = data.load(data.DataSpec())
    assert torch.equal(data.labels(splits.test), torch.tensor([int(y) for _, y in splits.test]))


def test_select_gathers_the_sample_across_requests_and_refuses_a_partial_capture():
    session = harness.PrivateSession(_report(eval_batch_size=4), data.load(data.DataSpec()))
    pairs = [harness.Pair("Infer", 0, torch.full((4, 1, 2, 2), float(r)), torch.zeros(4, 1, 2, 2),
                          session.infer_indices(r, 4)) for r in range(3)]  # images 0..11
    picked = harness.select(pairs, torch.tensor([1, 6, 11]))
    assert picked.recon.flatten(1)[:, 0].tolist() == [0.0, 1.0, 2.0]  # from requests 0, 1 and 2
    with pytest.raises(ValueError, match="1 of the 3 sample images were not reconstructed"):
        harness.select(pairs, torch.tensor([1, 6, 12]))


def _report(**kw) -> dict:
    return {"session_id": "s2", "eval_batch_size": 256, "train_set_size": 1438, "batch_size": 64, "seed": 0,
            "steps": 4, **kw}


def test_shard_sessions_leave_training_steps_unplaced():
    splits = data.load(data.DataSpec())
    assert harness.PrivateSession(_report(), splits).truth("Train", 1) is not None
    # a Ray client with one shard trains on a permutation of the whole split: same size, other order
    for report in (_report(train_set_size=100), _report(train_shard=True)):
        session = harness.PrivateSession(report, splits)
        assert session.truth("Train", 1) is None and session.truth("Infer", 0).shape == (256, 1, 16, 16)


def test_steps_sent_before_a_reconnect_are_placed_once(tmp_path):
    """A reconnect opens a new session id: a step sent under the old one and replayed under the new
    one is the same private batch, scored once."""
    splits = data.load(data.DataSpec())
    session = harness.PrivateSession(_report(session_ids=["s1", "s2"]), splits)
    truth = session.truth("Train", 2)
    for seq, sid in enumerate(["s1", "s2", "other"]):
        harness.write_reconstruction(tmp_path, seq, "Train", sid, 2, truth)
    pairs = harness.align(harness.read_reconstructions(tmp_path), harness.by_session_id([session]))
    assert len(pairs) == 1 and torch.equal(pairs[0].truth, truth)
    assert harness.align(harness.read_reconstructions(tmp_path)[:1], harness.by_session_id([session]))  # old id alone
    harness.clear_reconstructions(tmp_path)  # a re-run starts from an empty folder
    assert not (tmp_path / "recon.jsonl").exists() and not (tmp_path / "recon").exists()


@pytest.mark.slow
def test_tap_records_what_the_server_receives(tmp_path):
    tap = tmp_path / "tap"
    server = start_server("--tap", str(tap))
    try:
        config = EdgeConfig(epochs=1, max_steps=3, progress=False, job="tapped",
                            connection=ConnectionConfig(server=server.address))
        report = run(config, RemoteCloud(config.connection))
    finally:
        server.stop()
    records = capture.read_records(tap)
    assert {r.source for r in records} == {"tap"}
    assert [r.step_id for r in records if r.method == "Train"] == [1, 2, 3]
    assert sum(r.shape[0] for r in records if r.method == "Infer") == 359
    session = capture.read_sessions(tap)[0]
    assert session["session_id"] == report["session_id"]
    assert session["feature_shape"] == [32, 8, 8] and session["job"] == "tapped" and session["cut"] == "block1"


def test_score_refuses_unknown_sessions(attacked, tmp_path):
    recon = tmp_path / "recon"
    harness.write_reconstruction(recon, 0, "Infer", "someone-else", 0, torch.zeros(4, 1, 16, 16))
    (recon / "run.json").write_text(json.dumps({"method": "inversion"}))
    assert attacker_main(["score", "--recon", str(recon), "--edge-report", str(attacked["out"] / "edge.json"),
                          "--out", str(tmp_path / "r")]) == 2
