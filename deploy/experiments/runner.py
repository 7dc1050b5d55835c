"""Running a sweep: the long-lived services (a cloud-server and the eavesdropping proxy), each
point's processes (a `split-link`, `edge-client`, `attacker run` / `score`, a hijacking
`cloud-server`), the bases of a two-phase sweep, and the points in parallel as Ray tasks."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from deploy.experiments.config import (ATTACK_FLAGS, NO_HIJACK, Base, Point, SweepConfig, as_flags, check_points,
                                       scorer_data_of)
from deploy.experiments.results import (ATTACK_METRICS, LATENCY_METRICS, METRICS, POINT_SETTINGS, finished_rows,
                                        keep_results, metric_names, time_to_accuracy, write_atomic)
from deploy.link_profiles import DIRECT
from deploy.processes import ServerProcess, run_stage, start_process, start_server
from edge_client.config import HIJACK_EXIT
from splitnet import tracking
from splitnet.wire import MAX_KEPT_REPLIES

log = logging.getLogger("deploy.sweep")

# Steps between the edge's saved states: at most the replies the server keeps per client (a
# resumed edge gets them again).
STATE_EVERY = MAX_KEPT_REPLIES


class PointFailed(RuntimeError):
    def __init__(self, message: str, log_path: Path) -> None:
        super().__init__(message)
        self.log_path = log_path


def _python(log_path: Path, *args: str, timeout: float, ends: tuple[int, ...] = (0,)) -> None:
    """`python -m *args`, its output into `log_path`; an exit status not in `ends` is a failure, which
    names the process and its last words."""
    name = f"attacker {args[1]}" if args[0] == "attacks" else args[0].replace("_", "-")
    try:
        status = run_stage(list(args), log_path, timeout)
    except subprocess.TimeoutExpired:
        raise PointFailed(f"{name} ran past the point's timeout_s of {timeout:g} s", log_path) from None
    if status not in ends:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        raise PointFailed(f"{name} exited {status}: {lines[-1] if lines else '(no output)'}", log_path)


def run_point(config: SweepConfig, point: Point, proxy: str, capture: str, out: Path, log_dir: str = "") -> dict:
    """One point: train and serve through the proxy, attack the capture, score; returns the row.
    With `log_dir`, the point is TensorBoard run `log_dir/KEY`: the edge's and attackers' scalars,
    and the row as HParams.

    A point with a hijack trains against a hijacking `cloud-server` of its own (`hijacker`) instead,
    and its row holds that attacker's reconstructions scored (`_hijack_scores`). An edge stopped by
    its detector (exit 3, `detected` in its report) is a finished point: the stop is what it measures."""
    out.mkdir(parents=True, exist_ok=True)
    track = ["--log-dir", str(Path(log_dir) / point.key)] if log_dir else []
    edge_settings = dict(point.edge)
    base = read_base(out.parent.parent, point.base) if point.base else None
    init = ["--init-from", base["encoder"], "--init-job", base["job"]] if base else []
    hijacker = hijacker_for(point, out) if point.hijack != NO_HIJACK and not edge_finished(out) else None
    link = None
    try:
        upstream = hijacker.address if hijacker else proxy
        link = None if point.link == DIRECT else start_process(
            ["deploy.link", "--upstream", upstream, "--profile", point.link, "--seed", str(point.setting("seed"))],
            r"listening on (\S+) ->")
        server = link.address if link else upstream
        _train_edge(config, out, ["--server", server, "--report", str(out / "edge.json"), "--save-encoder",
                                  str(out / "encoder.pt"), "--no-progress", *track, *as_flags(edge_settings), *init],
                    resumable=point.hijack == NO_HIJACK)
        edge = json.loads((out / "edge.json").read_text())
        stopped = edge.get("detected", False)
        # a session of its own: the attacker, which reads the training session, skips it
        if point.latency_images and not stopped:
            _python(out / "edge-client-infer.log", "edge_client", "--infer-only", "--server", server, "--encoder",
                    str(out / "encoder.pt"), "--max-images", str(point.latency_images), "--report",
                    str(out / "latency.json"), *as_flags({**scorer_data_of(edge_settings),
                                                          "codec": point.setting("codec")}),
                    timeout=config.timeout_s)
    finally:
        for process in (link, hijacker):
            if process:
                process.stop()
    latency = json.loads((out / "latency.json").read_text()) if point.latency_images and not stopped else {}
    row: dict = {"key": point.key, "group": point.identity(seed=False), "cut": edge["cut"],
                 "bottleneck": edge["bottleneck"], "codec": point.setting("codec"), "defense": point.defense,
                 "seed": point.setting("seed"), "link": point.link,
                 "axes": {k: v for k, v in point.axes if k not in ("cut", "codec", "seed")},
                 **{k: edge.get(k) for k in METRICS}, **{k: latency.get(k) for k in LATENCY_METRICS},
                 "wall_seconds": edge["wall_seconds"], "epoch_seconds": [h["seconds"] for h in edge["history"]],
                 "epoch_train_accuracy": [h["train_accuracy"] for h in edge["history"]],
                 "defense_settings": edge["defense"], "settings": edge_settings,
                 "attack_settings": dict(point.attack), "history": edge["history"],
                 **({"base": {k: base[k] for k in BASE_IDENTITY if k in base}} if base else {}),
                 "hijack": point.hijack, "detected": stopped,
                 "detected_at_step": edge.get("detect", {}).get("detected_at_step"),
                 **({"detect_reason": edge["reason"]} if stopped else {})}
    row["time_to_accuracy_s"] = time_to_accuracy(row, config.target_accuracy)
    if point.hijack != NO_HIJACK:
        row.update(_hijack_scores(config, point, out, row["detected_at_step"]))
    skipped = _attacks_skipped(point, stopped)
    if skipped:
        row["attacks_skipped"] = skipped
    sample = ["--per-class", str(point.per_class), "--grid", "20"] if point.per_class else []
    encoder_digest = "" if skipped else hashlib.sha256((out / "encoder.pt").read_bytes()).hexdigest()
    for method in ([] if skipped else point.methods):
        for variant, settings in (("", point.attack), *point.variants):
            name = f"{method}_{variant}" if variant else method
            recon, scored = out / f"recon-{name}", out / f"attack-{name}"
            attack_flags = [flag for key, value in settings for flag in (ATTACK_FLAGS[key], str(value))]
            run = ["attacks", "run", "--capture", capture, "--session", edge["session_id"], "--method", method,
                   "--encoder", str(out / "encoder.pt"), "--seed", str(point.setting("seed")), "--out", str(recon),
                   *track, *attack_flags, *point.attack_args]
            score = ["attacks", "score", "--recon", str(recon), "--edge-report", str(out / "edge.json"), "--out",
                     str(scored), *as_flags(scorer_data_of(edge_settings)), *sample]
            # where TensorBoard's copy of the attacker's curves goes is no part of its result
            stage = {"run": [a for a in run if a not in track], "score": score, "encoder_sha256": encoder_digest}
            if _stage_done(out / f"attack-{name}.stage.json", stage):
                log.info("%s: %s attacked and scored before the sweep was interrupted; kept", out.name, name)
            else:
                _python(out / f"attacker-run-{name}.log", *run, timeout=config.timeout_s)
                _python(out / f"attacker-score-{name}.log", *score, timeout=config.timeout_s)
                write_atomic(out / f"attack-{name}.stage.json", json.dumps(stage, indent=2) + "\n")
            scores = json.loads((scored / "attack.json").read_text())
            row.update({f"{name}_{m}": scores[m] for m in ATTACK_METRICS})
            if "sample" in scores:
                row["scored_sample"] = scores["sample"]
            row[f"{name}_attacker"] = json.loads((recon / "run.json").read_text())  # what produced the scores
            row[f"{name}_grid"] = str((scored / "recon.png").relative_to(out.parent.parent))
    # the cloud's label inference from the gradients sent up (attacks.label_run)
    if edge.get("u_shaped") and not skipped:
        _python(out / "attacker-labels.log", "attacks", "labels", "--capture", capture, "--edge-report",
                str(out / "edge.json"), "--out", str(out / "labels"), *as_flags(scorer_data_of(edge_settings)),
                "--seed", str(point.setting("seed")), timeout=config.timeout_s)
        leak = json.loads((out / "labels" / "labels.json").read_text())
        row.update({"label_direction_accuracy": leak["per_step"]["direction_accuracy"],
                    "label_nearest_known_accuracy": leak["per_step"]["nearest_known_accuracy"],
                    "label_pooled_accuracy": leak["pooled"]["direction_accuracy"],
                    **({"label_norm_leak_auc": leak["norm_leak_auc"]} if "norm_leak_auc" in leak else {})})
    write_atomic(out / "result.json", json.dumps(row, indent=2) + "\n")
    if log_dir:  # accuracy and the attacks' scores first: TensorBoard's HParams table shows five metrics at first
        order = ("test_accuracy", *metric_names(config)[len(METRICS):], *METRICS)
        tracking.write_point(log_dir, point.key, {k: row[k] for k in POINT_SETTINGS}, {m: row.get(m) for m in order})
    return row


def hijacker_for(point: Point, out: Path) -> ServerProcess:
    """The point's hijacking `cloud-server`, recording into `out/hijack`. One per point rather than
    one per sweep: the attack's networks live in the server's job and are in no checkpoint (so the
    point never resumes, see `_train_edge`); the folder it records into (cleared as it starts)
    holds the point's session alone, which the scorer reads; and the points of a parallel sweep
    do not share one server's CPU. A start costs seconds, the point's training minutes."""
    return start_server("--hijack", point.hijack, *as_flags(dict(point.hijack_settings)), "--hijack-out",
                        str(out / "hijack"), "--threads", "1")


def _hijack_scores(config: SweepConfig, point: Point, out: Path, detected_at: int | None) -> dict:
    """The hijacker's reconstructions of the edge's private training batches, scored against the
    real ones step by step (`attacker score --by-step`): at the last recorded step (`hijack_ssim`,
    `hijack_mse`, `hijack_psnr`, `hijack_step`), the best step (`hijack_ssim_max`), and where the
    edge's detector stopped it, the last recorded step up to the stop (`hijack_ssim_at_detection`)."""
    scored = out / "hijack-score"
    _python(out / "attacker-score-hijack.log", "attacks", "score", "--recon", str(out / "hijack"), "--edge-report",
            str(out / "edge.json"), "--by-step", "--out", str(scored), *as_flags(scorer_data_of(dict(point.edge))),
            timeout=config.timeout_s)
    by_step = json.loads((scored / "attack.json").read_text())["train_by_step"]
    last = by_step[-1]
    upto = [s for s in by_step if detected_at is not None and s["step_id"] <= detected_at]
    return {**{f"hijack_{m}": last[m] for m in ATTACK_METRICS}, "hijack_step": last["step_id"],
            "hijack_ssim_max": max(s["ssim"] for s in by_step),
            "hijack_ssim_at_detection": upto[-1]["ssim"] if upto else None,
            "hijack_ssim_by_step": [[s["step_id"], s["ssim"]] for s in by_step],
            "hijack_settings": dict(point.hijack_settings),
            "hijack_grid": str((scored / "recon.png").relative_to(out.parent.parent))}


def _attacks_skipped(point: Point, stopped: bool) -> str:
    """Why the point's eavesdropping attacks do not run ("": they run)."""
    if point.hijack != NO_HIJACK:
        return ("the point trained against a hijacking server, which is its attacker (hijack_*); the eavesdropper's "
                "proxy stands in front of the honest server only")
    if stopped:
        return "the edge's detector stopped it: it saved no encoder for the attacker to train against"
    return ""


def _stage_done(record: Path, stage: dict) -> bool:
    """Whether an attack stage already ran to its end with exactly these commands on this encoder
    (`record`, written after its score): an attacker trains for as long as the edge did, so a sweep
    interrupted between a point's attackers does not train the finished ones again. A retrained
    edge (a new session or encoder) or a changed attack setting runs the stage again."""
    try:
        return json.loads(record.read_text()) == stage
    except (OSError, ValueError):
        return False


def edge_finished(out: Path, stop_ends: bool = True) -> bool:
    """Whether the edge of the point or base in `out` ran to its end in its attempt's job: its report
    (`edge.json`, written at the end of a run) names that job. The report an edge stopped by its
    hijacking detector leaves (`detected`) ends a point (`stop_ends`: the stop is its result), not a
    base, which must be trained whole for its points to continue it."""
    try:
        report = json.loads((out / "edge.json").read_text())
        return ((stop_ends or not report.get("detected"))
                and report.get("job") == json.loads((out / "attempt.json").read_text())["job"])
    except (OSError, ValueError, KeyError):
        return False


def _train_edge(config: SweepConfig, out: Path, flags: list[str], resumable: bool = True, point: bool = True) -> None:
    """The point's edge-client, resumable: it keeps its state in `out/state` every STATE_EVERY steps
    (each time after the server checkpointed its job), so a point whose sweep was killed carries
    on from there when the sweep runs again, in the job it trained in (`out/attempt.json`), and
    ends as it would have uninterrupted. A resume that fails (the server's checkpoint of the job
    is gone or behind the state) starts the point over, in a fresh job: a retried point never
    trains against a decoder an interrupted attempt left half-trained; one that is not `resumable`
    (a hijacking server's job, whose attack is in no checkpoint) starts over. An edge whose attempt
    ended (its report names the attempt's job) is not run again: a resumed run would open a new
    session, and the attacks of the point read the session its report names. A `point`'s edge
    stopped by its detector (exit 3) ended; a base's did not."""
    state, attempt_file = out / "state", out / "attempt.json"
    if edge_finished(out, stop_ends=point):
        log.info("%s: the edge trained to its end before the sweep was interrupted; kept", out.name)
        return
    resuming = resumable and attempt_file.exists() and any(state.glob("*.ckpt"))
    for fresh in ([False, True] if resuming else [True]):
        if fresh:
            shutil.rmtree(state, ignore_errors=True)
            write_atomic(attempt_file, json.dumps({"job": f"{out.name}-{uuid.uuid4().hex[:6]}"}) + "\n")
        job = json.loads(attempt_file.read_text())["job"]
        try:
            # no state where it could not resume: a server without checkpoints would not confirm one
            keep = ["--state-dir", str(state), "--state-every", str(STATE_EVERY)] if resumable else []
            _python(out / "edge-client.log", "edge_client", "--job", job, *keep, *([] if fresh else ["--resume"]),
                    *flags, timeout=config.timeout_s, ends=(0, HIJACK_EXIT) if point else (0,))
            return
        except PointFailed as err:
            if fresh:
                raise
            shutil.copy(out / "edge-client.log", out / "edge-client-resume.log")  # why, for the curious
            log.warning("%s: the interrupted run could not be resumed (%s; log: edge-client-resume.log); starting "
                        "the point over", out.name, err)


def read_base(out: Path, base: Base) -> dict:
    """A finished base's record (`bases/KEY/base.json`): `key`, `job` (its job on the sweep's server,
    whose checkpoint is `jobs/CHECKPOINT`), `checkpoint`, `encoder` (its encoder file),
    `test_accuracy`, `settings`, `encoder_sha256` (bases trained before it was kept have none)."""
    return json.loads((out / "bases" / base.key / "base.json").read_text())


BASE_IDENTITY = ("key", "job", "test_accuracy", "settings", "encoder_sha256")  # what a row keeps of its base


def other_bases(rows: list[dict], records: dict[str, dict]) -> dict[str, str]:
    """For each base of `records` (key -> its record here) that finished rows continue in another
    training, why no point may continue it here: base key -> message.

    A base trained again is not the same base: the same settings and seed on another machine
    (other CPU kernels) or after another commit end elsewhere (seed 1's base of the CIFAR-10 study:
    test accuracy 0.8136, then 0.8131 on a new machine), and a point continued from it cannot be
    read against a noise curve continued from the first. Told apart by the encoder's digest, or,
    for rows kept before it was, by the base's test accuracy."""
    found: dict[str, str] = {}
    for key, record in records.items():
        others = [row for row in rows if row.get("base", {}).get("key") == key and not _same_base(row["base"], record)]
        if others:
            old = sorted({row["base"]["test_accuracy"] for row in others})
            found[key] = (f"its base {key} was trained here (test accuracy {record['test_accuracy']}), but "
                          f"{len(others)} finished point(s) ({others[0]['key']}, ...) continue another training of it "
                          f"(test accuracy {', '.join(map(str, old))}), whose files were not carried here; points of "
                          f"two bases are not read against each other. Bring that base (OUT/bases/{key}/ and its "
                          "decoder's checkpoint in OUT/jobs/), or keep the new points in another --results folder")
    return found


def _same_base(kept: dict, record: dict) -> bool:
    if kept.get("encoder_sha256") and record.get("encoder_sha256"):
        return kept["encoder_sha256"] == record["encoder_sha256"]
    return kept.get("test_accuracy") == record["test_accuracy"]


def base_ready(out: Path, base: Base) -> bool:
    """Whether `base` was trained and both its halves are still there (the encoder file and the
    decoder's checkpoint: a results folder carried to another machine holds neither)."""
    if not (out / "bases" / base.key / "base.json").exists():
        return False
    record = read_base(out, base)
    return Path(record["encoder"]).exists() and (out / "jobs" / record["checkpoint"]).exists()


def run_base(config: SweepConfig, base: Base, server: str, out: Path) -> dict:
    """Phase A: train `base` straight to the server (nothing of it is attacked, so not through the
    proxy); the edge's Flush makes its decoder's checkpoint durable before `base.json` says it is done."""
    from cloud_server.checkpoints import file_stem

    folder = out / "bases" / base.key
    folder.mkdir(parents=True, exist_ok=True)
    _train_edge(config, folder, ["--server", server, "--report", str(folder / "edge.json"), "--save-encoder",
                                 str(folder / "encoder.pt"), "--no-progress", *as_flags(dict(base.edge))], point=False)
    edge = json.loads((folder / "edge.json").read_text())
    job = edge["job"]
    if not edge["durable"]:
        raise PointFailed(f"base {base.key}: the server did not checkpoint its decoder", folder / "edge-client.log")
    record = {"key": base.key, "job": job, "checkpoint": f"{file_stem(job)}.ckpt", "encoder": str(folder / "encoder.pt"),
              "test_accuracy": edge["test_accuracy"], "settings": dict(base.edge), "history": edge["history"],
              "wall_seconds": edge["wall_seconds"],
              "encoder_sha256": hashlib.sha256((folder / "encoder.pt").read_bytes()).hexdigest()}
    write_atomic(folder / "base.json", json.dumps(record, indent=2) + "\n")
    return record


def attempt(work: Callable[..., dict], *args, out: Path) -> dict:
    """`work(*args)` (`run_point`, `run_base`), whose failure comes back as {"error": message, "log":
    path} instead of raising: a sweep that keeps going records it, and a Ray task's failure needs no
    unwrapping."""
    try:
        return work(*args)
    except PointFailed as err:
        return {"error": str(err), "log": str(err.log_path)}
    except Exception as err:  # a missing or unreadable output of a process that said it succeeded
        log.exception("%s", out.name)
        return {"error": f"{type(err).__name__}: {err}", "log": str(out)}


class Services:
    """The sweep's long-lived processes: one cloud-server and the eavesdropping proxy in front of it."""

    def __init__(self, out: Path, jobs: int) -> None:
        """The server keeps its jobs in `out/jobs`: where the bases' decoders wait for the points of
        later runs, and where an interrupted point's job resumes from (see `_train_edge`)."""
        self.capture = str(out / "capture")
        # Every point is a job of its own, kept until the sweep ends: room for all of them.
        self.server: ServerProcess = start_server("--max-jobs", str(max(jobs, 1)), "--checkpoint-dir", str(out / "jobs"))
        try:
            self.proxy = start_process(["attacks", "proxy", "--listen", "127.0.0.1:0", "--upstream",
                                        self.server.address, "--capture", self.capture], r"listening on (\S+) ->")
        except Exception:
            self.server.stop()
            raise

    def stop(self) -> None:
        self.proxy.stop()
        self.server.stop()


class SweepFailed(RuntimeError):
    """Points that failed (key -> {"error": message, "log": path}), and the rows of those that finished."""

    def __init__(self, failures: dict[str, dict], rows: list[dict]) -> None:
        super().__init__(f"{len(failures)} point(s) failed: " + "; ".join(
            f"{key}: {f['error']} (log: {f['log']})" for key, f in failures.items()))
        self.failures, self.rows = failures, rows


def add_log_dir_arg(p) -> None:
    """`--log-dir` of the commands that run a sweep (split-sweep, split-demo)."""
    p.add_argument("--log-dir", default="", metavar="DIR",
                   help="write TensorBoard event files here: one run per point (its edge's and attackers' scalars, "
                        "its settings and final metrics as HParams) ('track' extra)")


def run_sweep(config: SweepConfig, out: Path, progress: bool = True, keep_going: bool = False,
              log_dir: str = "", results: Path | None = None) -> list[dict]:
    """Run the points without a result (in `out/points/KEY/result.json` or `results/KEY.json`), their
    bases first (a two-phase sweep), and return every finished point's row, in grid order; with
    `results`, every finished point's result is kept there too.

    A failure stops the sweep, or with `keep_going` is recorded while the other points run;
    either way the failures go to `failed.json` and `SweepFailed` is raised, naming them."""
    points = config.points()
    check_points(points)
    out.mkdir(parents=True, exist_ok=True)
    finished = finished_rows(points, out, results)
    done = {row["key"] for row in finished}
    todo = [p for p in points if p.key not in done]
    log.info("%d points, %d already done", len(points), len(points) - len(todo))
    failures: dict[str, dict] = {}
    if todo:
        bases = list(dict.fromkeys(p.base for p in todo if p.base and not base_ready(out, p.base)))
        services = Services(out, jobs=4 * (len(todo) + len(bases)))
        try:
            if bases:
                log.info("phase A: %d base(s) to train", len(bases))
                failures = _run_all(config, {b.key: functools.partial(
                    attempt, run_base, config, b, services.server.address, out, out=out / "bases" / b.key)
                    for b in bases}, progress, keep_going, "bases")
                for point in todo:
                    if point.base and point.base.key in failures:
                        failures[point.key] = {"error": f"its base {point.base.key} failed", "log":
                                               failures[point.base.key]["log"]}
            if not failures or keep_going:
                ready = {p.base.key: read_base(out, p.base) for p in todo if p.base and p.base.key not in failures}
                refused = other_bases(finished, ready)
                failures |= {p.key: {"error": refused[p.base.key], "log": str(out / "bases" / p.base.key / "base.json")}
                             for p in todo if p.base and p.base.key in refused}
            if not failures or keep_going:
                runnable = {p.key: p for p in todo if p.key not in failures}
                kept = (lambda key: keep_results(finished_rows([runnable[key]], out), results)) if results else None
                failures |= _run_all(config, {key: functools.partial(
                    attempt, run_point, config, p, services.proxy.address, services.capture, out / "points" / key,
                    log_dir, out=out / "points" / key) for key, p in runnable.items()}, progress, keep_going, "sweep",
                    kept)
        finally:
            services.stop()
    rows = finished_rows(points, out, results)
    if results is not None:
        keep_results(rows, results)
    if failures:
        write_atomic(out / "failed.json", json.dumps(failures, indent=2) + "\n")
        raise SweepFailed(failures, rows)
    (out / "failed.json").unlink(missing_ok=True)  # an earlier run's failures, now done
    return rows


def _run_all(config: SweepConfig, work: dict[str, Callable[[], dict]], progress: bool, keep_going: bool,
             desc: str, done: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run each of `work` (key -> a call of `attempt`), `config.workers` at a time, calling `done`
    with the key of each that succeeds (a point's result is kept at once: a study stopped
    midway keeps what finished); returns the failures."""
    bar = tqdm(total=len(work), desc=desc, unit="run", disable=not progress)
    start = time.monotonic()
    failures: dict[str, dict] = {}

    def finished(key: str, result: dict) -> bool:
        """Log the run's end; whether the sweep goes on."""
        bar.update(1)
        if "error" in result:
            failures[key] = result
            log.error("%s failed: %s (log: %s)", key, result["error"], result["log"])
            return keep_going
        log.info("%s done (%.0f s elapsed)", key, time.monotonic() - start)
        if done:
            done(key)
        return True

    if config.workers <= 1:
        for key, call in work.items():
            if not finished(key, call()):
                break
    else:
        from deploy.sim.config import ray_environment

        os.environ.update(ray_environment(local=True))  # the cluster started here inherits it
        import ray

        ray.init(num_cpus=config.workers, include_dashboard=False)
        try:
            task = ray.remote(num_cpus=1)(_call)
            pending = {task.remote(call): key for key, call in work.items()}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                if not finished(pending.pop(ready[0]), ray.get(ready[0])):
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    break
        finally:
            ray.shutdown()
    bar.close()
    return failures


def _call(work: Callable[[], dict]) -> dict:
    """A Ray task's body: the work it was handed (a partial of `attempt`, which travels by reference)."""
    return work()
