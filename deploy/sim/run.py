"""The Ray simulation's one entry: `run_clients` chooses the engine (an actor per client, or
virtual clients over a pool of workers), drives it through the same steps and reports."""

from __future__ import annotations

import time

from deploy.sim.actors import ActorRun
from deploy.sim.bookkeeping import Run, cluster_nodes, report
from deploy.sim.config import RayRunConfig
from deploy.sim.virtual import VirtualRun


def run_clients(config: RayRunConfig) -> dict:
    """Train `config.clients` edge clients on an initialised Ray, one actor each or, with
    `config.virtual`, as virtual clients over a pool of workers; the run's JSON report.

    The report's `server_steps_applied` is how many steps the server applied to the
    job's decoder during the run (a Stats difference, so other users of the same job
    would be counted too) and `client_steps_sent` the sum of the steps the clients last
    reported sending. Each step id is applied exactly once, and a step the server reports
    as a duplicate is one it had already applied, so the two agree unless a client died
    between sending steps and reporting them (its entry's `server_last_step` then says
    how far the server got with it).
    """
    nodes = cluster_nodes()
    started = time.perf_counter()
    run: Run = VirtualRun(config) if config.virtual else ActorRun(config)
    try:
        before = run.server.stats().steps_applied
        skew = run.start()
        run.train()
        run.finish()
        job = run.server.stats()
    finally:
        run.stop()
    last_steps = dict(job.client_last_step)
    return report(config, [c.entry(last_steps) for c in run.clients], run.rounds, skew, job.steps_applied - before,
                  time.perf_counter() - started, nodes, **run.report_keys())
