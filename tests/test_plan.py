"""`split-plan` on a sweep's results: the Pareto front of (time, SSIM, accuracy) on one link and the
recommendation under limits. The results are written here as a sweep writes them (results.json
`rows`), with numbers chosen so that each rule decides."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deploy.experiments.pareto import nondominated
from deploy.experiments.plan import PlanConfig, PlanError, plan


def _row(link, cut, codec, seconds, ssim, accuracy, latency=None, defense="none"):
    return {"link": link, "cut": cut, "bottleneck": 8, "codec": codec, "defense": defense, "axes": "",
            "seconds_per_epoch": seconds, "inversion_ssim": ssim, "test_accuracy": accuracy,
            "latency_ms_p50": latency, "time_to_accuracy_s": 2 * seconds, "seeds": 1}


ROWS = [  # a constrained uplink makes fp32 slow; on Wi-Fi every setting takes the same time
    _row("constrained", "block1", "fp32", 14.0, 0.90, 0.97, 95.0),
    _row("constrained", "block1", "int8", 5.0, 0.89, 0.96, 90.0),
    _row("constrained", "block2", "fp32", 5.2, 0.70, 0.95, 92.0),
    _row("constrained", "block2", "int8", 4.0, 0.70, 0.94, 89.0),
    _row("wifi", "block1", "fp32", 3.0, 0.90, 0.97, 8.0),
    _row("wifi", "block1", "int8", 2.9, 0.89, 0.96, 7.9),
    _row("wifi", "block2", "fp32", 3.1, 0.70, 0.95, 8.1),
    _row("wifi", "block2", "int8", 3.0, 0.70, 0.94, 8.0),
]


@pytest.fixture()
def results(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": ROWS, "points": []}))
    return str(path)


def test_nondominated_minimises_every_coordinate():
    points = [(1, 5, 5), (2, 2, 2), (3, 3, 3), (1, 5, 5), (0, 9, 9)]
    assert nondominated(points) == [0, 1, 3, 4]  # (3, 3, 3) is beaten by (2, 2, 2); ties dominate no one


def test_the_recommended_cut_and_codec_follow_the_link(results):
    slow = plan(PlanConfig(results, link="constrained"))
    fast = plan(PlanConfig(results, link="wifi"))
    # Constrained: block2/int8 is fastest by more than 10%, so time decides.
    assert slow["recommended"]["choice"] == "block2-b8 / int8 / none"
    # Wi-Fi: all four within 10% of the fastest, so the most accurate wins.
    assert fast["recommended"]["choice"] == "block1-b8 / fp32 / none"
    # block1/fp32 on the constrained link is slowest and leaks most, but it is the most accurate: on the front.
    assert [e["choice"] for e in slow["front"]] == ["block2-b8 / int8 / none", "block1-b8 / int8 / none",
                                                    "block2-b8 / fp32 / none", "block1-b8 / fp32 / none"]
    assert slow["link_profile"]["up_mbps"] == 2 and slow["time_key"] == "seconds_per_epoch"


def test_limits_exclude_and_are_named(results):
    private = plan(PlanConfig(results, link="wifi", max_ssim=0.8))
    assert private["recommended"]["choice"] == "block2-b8 / fp32 / none"  # the most accurate under the SSIM bound
    breaks = {e["choice"]: e["breaks"] for e in private["front"]}
    assert breaks["block1-b8 / fp32 / none"] == ["--max-ssim"] and breaks["block2-b8 / fp32 / none"] == []
    tight = plan(PlanConfig(results, link="constrained", max_latency_ms=89.5, min_accuracy=0.95))
    assert tight["recommended"] is None and "none of the 4 settings meets the limits" in tight["reason"]
    latency = plan(PlanConfig(results, link="constrained", metric="latency", time_tolerance=0.0))
    assert latency["recommended"]["choice"] == "block2-b8 / int8 / none" and latency["recommended"]["time"] == 89.0


@pytest.mark.parametrize("config, needle", [
    ({}, "the sweep ran 2 links; pick one with --link: constrained, wifi"),
    ({"link": "lte"}, "--link lte: the sweep did not run it (its links: constrained, wifi)"),
    ({"link": "wifi", "method": "rmle"}, "--method rmle: the sweep has attack SSIM of inversion"),
])
def test_questions_the_results_cannot_answer_name_the_flag(results, config, needle):
    with pytest.raises(PlanError) as err:
        plan(PlanConfig(results, **config))
    assert needle in str(err.value)


def test_a_sweep_without_latency_says_how_to_get_it(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": [_row("wifi", "block1", "fp32", 3.0, 0.9, 0.97)]}))
    with pytest.raises(PlanError, match=r"--metric latency: .* \(set \[run\] latency_images in the sweep\)"):
        plan(PlanConfig(str(path), metric="latency"))
    assert plan(PlanConfig(str(path)))["link"] == "wifi"  # the only link: no --link needed


def test_the_command_prints_the_front_and_exits_1_without_a_recommendation(results):
    cmd = [sys.executable, "-m", "deploy.experiments.plan", "--results", results, "--link", "constrained"]
    done = subprocess.run(cmd + ["--max-ssim", "0.8"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| block2-b8 / int8 / none **(recommended)** | 4.00 | 0.700 | 0.940 | yes |" in done.stdout
    assert "recommended: block2-b8 / int8 / none: 4.00 s/epoch" in done.stdout
    none = subprocess.run(cmd + ["--min-accuracy", "0.99", "--json"], capture_output=True, text=True, timeout=60)
    assert none.returncode == 1 and json.loads(none.stdout)["recommended"] is None
    bad = subprocess.run(cmd + ["--max-ssim", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--max-ssim must be a finite number >= 0" in bad.stderr
