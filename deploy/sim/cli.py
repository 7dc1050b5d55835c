"""`split-ray`: many edge clients at once, each a Ray actor, against one cloud server.

Every edge-client option applies to every client. One machine, a server started for the run:

    split-ray --clients 3 --start-server --mode splitfed --epochs 3 --report out/ray.json

A thousand virtual clients over two worker actors, a tenth of them in each round (--epochs rounds):

    split-ray --clients 1000 --workers 2 --fraction 0.1 --start-server --mode splitfed --epochs 3

A Ray cluster (`ray start --head` / `ray start --address`, with RAY_AUTH_MODE=token: docs/DEPLOY.md)
and a cloud server elsewhere:

    split-ray --address 10.0.0.10:6379 --server 10.0.0.5:50051 --clients 8 --mode parallel --partition dirichlet:0.5

Exit status: 0 when every client finished, 1 when some failed (the report names them),
2 for a usage or data error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from deploy.sim.config import (MODES, Kill, PartitionSpec, RayRunConfig, VirtualClients, ray_environment,
                               runtime_env)
from edge_client import cli as edge_cli
from edge_client import report as report_mod
from edge_client.config import EdgeConfig
from splitnet.cli_util import add_config_args, names_missing_extra, new_parser, parse_args, setup_logging
from splitnet.security import AUTH_ENV

log = logging.getLogger("deploy.ray")
SHOWN_CLIENTS = 16  # clients listed on the terminal; beyond, only failed ones (the report has every one)


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("split-ray", __doc__)
    edge_cli.add_training_args(p)
    g = p.add_argument_group("many clients (Ray)")
    g.add_argument("--clients", type=int, default=2, help="edge clients: one Ray actor each, or virtual clients over --workers (default %(default)s)")
    g.add_argument("--mode", default="parallel", choices=MODES,
                   help="sequential: take turns passing the encoder on; parallel: all at once, own encoders; "
                        "splitfed: parallel + FedAvg of the encoders after every epoch (default %(default)s)")
    g.add_argument("--partition", default="iid",
                   help="iid, or dirichlet:ALPHA for label-skewed shards (smaller ALPHA: more skew)")
    g.add_argument("--address", default="",
                   help="Ray cluster to join (auto, or HEAD_IP:6379); default: start one on 127.0.0.1 for the run")
    g.add_argument("--start-server", action="store_true",
                   help="start a cloud-server on 127.0.0.1 for the run and stop it after (instead of --server)")
    g.add_argument("--cpus-per-client", type=float, default=0.0,
                   help="Ray CPUs reserved per actor, client or worker (default: the cluster's CPUs shared out, at "
                        "most 1 each)")
    g.add_argument("--kill", default="", metavar="CLIENT@ROUND",
                   help="fault injection: ray.kill client CLIENT (0-based) in the middle of round ROUND (1-based); "
                        "with --workers, the worker running its turn (which then runs again on another)")
    v, g = VirtualClients(), p.add_argument_group("virtual clients (--workers)")
    g.add_argument("--workers", type=int, nargs="?", const=0, default=None, metavar="W",
                   help="run the --clients as virtual clients over W worker actors, their state kept between turns "
                        "outside the workers (no W, or 0: as many as Ray's CPUs allow); default: one actor per client")
    g.add_argument("--fraction", type=float, default=v.fraction, metavar="F",
                   help="share of the clients that take part in each round, a seeded sample")
    g.add_argument("--min-clients", type=int, default=v.min_clients, metavar="K",
                   help="at least this many clients take part in each round")
    g.add_argument("--local-steps", type=int, default=v.local_steps, metavar="S",
                   help="a turn is S training steps, carrying on through the client's shard (0: one local epoch)")
    g.add_argument("--spill-dir", default=v.spill_dir, metavar="DIR",
                   help="keep the clients' states as files here (on a cluster: a folder every machine shares) "
                        "instead of in Ray's object store")
    p.add_argument("--report", default="",
                   help="write the JSON report here, and one JSON line per client beside it (REPORT.clients.jsonl)")
    add_config_args(p)
    return p


def absolute_paths(edge: EdgeConfig) -> EdgeConfig:
    """`edge` with its TLS files and data folder as absolute paths (the driver's folder for a relative one).

    An actor opens them in its own working directory, which on a node of a cluster is the folder
    `ray start` ran in there, not the driver's: `--tls-ca ca.pem` that the driver reads would fail in
    every actor (tests/test_multihost.py starts its nodes elsewhere and saw exactly that)."""
    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if path else path

    connection = dataclasses.replace(edge.connection, **{name: absolute(getattr(edge.connection, name))
                                                          for name in ("tls_ca", "tls_cert", "tls_key")})
    data = dataclasses.replace(edge.data, data_root=absolute(edge.data.data_root))
    return dataclasses.replace(edge, connection=connection, data=data)


@names_missing_extra("split-ray")
def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = parse_args(p, argv)
    if args.list_cuts:
        return edge_cli.main(["--list-cuts"])
    if args.start_server and args.address:
        p.error("--start-server binds 127.0.0.1, out of reach of other machines' actors: with --address, start "
                "cloud-server --host ADDRESS yourself and pass --server")
    edge = absolute_paths(edge_cli.config_from_args(args, p))
    if args.start_server and (edge.connection.tls_ca or edge.connection.tls_cert):
        p.error("--start-server starts a plain loopback server: for TLS, start cloud-server --tls-cert/--tls-key "
                "yourself and pass --server")
    if args.workers is None:
        given = [flag for flag, value, default in (("--fraction", args.fraction, 1.0), ("--min-clients",
                 args.min_clients, 1), ("--local-steps", args.local_steps, 0), ("--spill-dir", args.spill_dir, ""))
                 if value != default]
        if given:
            p.error(f"{given[0]} is for virtual clients: add --workers [W]")
    try:
        # the spill folder absolute: the workers run in other folders
        virtual = None if args.workers is None else VirtualClients(
            args.workers, args.fraction, args.min_clients, args.local_steps,
            str(Path(args.spill_dir).resolve()) if args.spill_dir else "")
        config = RayRunConfig(edge, args.clients, args.mode, PartitionSpec.parse(args.partition), args.threads,
                              args.cpus_per_client, Kill.parse(args.kill) if args.kill else None, virtual)
    except ValueError as err:
        p.error(str(err))
    if virtual and virtual.spill_dir:
        os.makedirs(virtual.spill_dir, exist_ok=True)
    setup_logging(args.verbose)
    env = ray_environment(local=not args.address)
    os.environ.update(env)  # before Ray is imported: it reads some of them only then
    import grpc
    import ray

    from cloud_server.config import ServerConfig
    from deploy.processes import start_server
    from deploy.sim.run import run_clients
    from splitnet.data import DatasetNotFound

    # The clients' token, if any, is the one the server accepts (through the environment,
    # not its command line, which any local user can read).
    token = {AUTH_ENV: edge.connection.auth_token} if edge.connection.auth_token else {}
    # Every client of this server runs on this host, so they are all one peer to its stream caps
    # (cloud_server.streams.peer_key): their share is the whole of --max-streams.
    one_peer = ("--max-streams-per-peer", str(ServerConfig.max_streams))
    server = start_server(*one_peer, env=token, fork=False) if args.start_server else None
    if server:
        log.info("cloud-server started at %s", server.address)
        connection = dataclasses.replace(edge.connection, server=server.address)
        config = dataclasses.replace(config, edge=dataclasses.replace(edge, connection=connection))
    try:
        ray.init(address=args.address or None, include_dashboard=False, runtime_env=runtime_env(env, args.address))
        report = run_clients(config)
    except DatasetNotFound as err:
        print(f"split-ray: error: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:  # the driver's own Stats call: the server is not there
        print(f"split-ray: error: cloud server {config.edge.connection.server}: {err.code().name}: {err.details()}",
              file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
        if server:
            server.stop()
    print(report_mod.summary(report))
    rows = report.pop("client_reports")
    for c in rows if len(rows) <= SHOWN_CLIENTS else [c for c in rows if c["error"]][:SHOWN_CLIENTS]:
        accuracy = "-" if c["test_accuracy"] is None else f"{c['test_accuracy']:.4f}"
        print(f"  {c['client_id']}  {c['status']:6}  node {c['node_ip'] or '-'}  shard {c['shard_size']:5}  "
              f"steps {c['steps'] or 0:5}  test_accuracy {accuracy}" + (f"  {c['error']}" if c["error"] else ""))
    if args.report:
        beside = Path(args.report).with_suffix(".clients.jsonl")
        report_mod.write({**report, "client_rows": beside.name}, args.report)
        report_mod.write_lines(rows, beside)
        log.info("report written to %s, a line per client to %s", args.report, beside)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
