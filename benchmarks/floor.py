"""The floor under the split: what one gRPC round trip of the split's own message sizes costs from
Python, with nothing of this project in it, beside what the split costs.

A bare echo service runs in a process of its own (this script with `--serve`), on the channel
options the split uses (`splitnet.wire`): every request is raw bytes whose first 25 say how many
bytes to answer, for how long to compute first, and whether to run the model's cloud half first.
Timed one request in flight, lock-step, after a warm-up:

- `train`: a training step's `TrainStep` up and its `TrainResult` down (the model's cut, batch
  `--batch-size`, fp32: the sizes `benchmarks/transport.py` sends), over one stream, as `Train`
  runs;
- `infer batch N`: one `InferRequest` of N images' features up (cut `--infer-cut` with the
  8-channel bottleneck, fp32: `benchmarks/inference.py`'s default) and its `Prediction` down,
  over a stream (as `Infer`) and as unary calls.

Each over the stream three times: back to back (`stream`: both processes hot, the lowest a round trip
costs) and at the split's pace (`stream_paced`: the client computes for half the one-process
step or request before each message and the server for the other half before its answer, so
that each side sits idle while the other computes, as in a lock-step split; the server's
compute is taken off the time). A process woken after milliseconds idle answers more slowly
than one kept busy by a tight loop, and that is part of what any split pays. And a third time
paced by the model itself (`stream_model_paced`, `Halves`): the client runs the edge's half of
the model (an inference request's encoder, or a training step's encoder forward, backward and
SGD step) before each message and the server the cloud's half before its answer, each on
zeros, the whole request or step timed. That is the split with none of this project in it: no
codec, message, check, session or job, only the model's halves in two processes and a bare
round trip between them; what a split cannot go below, whatever its transport code.

The model is the digits cnn (training at its default cut, inference at block1), or with
`--cifar10 DIR` the converged CIFAR-10 study's (`model_flags.py`: pool2 with the bottleneck for
both, batch 128).

First, in the same run, `benchmarks/transport.py` (one process vs the lock-step split) and
`benchmarks/inference.py` (local vs loopback alone: an emulated link timed between them would
leave both sides' caches cold) for the same model and sizes, so that each split figure reads
against the floor: `train_overhead_ms` (split step time minus local step time minus the floor's
round trip: what is ours; `train_overhead_paced_ms` against the paced floor), and
`split_over_floor_plus_local` (the split's median latency over the floor's round trip plus the
local model's latency; issue target 1.3; `split_over_paced_floor_plus_local` likewise). Against
the model-paced floor: `model_alone_ms_p50` / `model_alone_step_ms` (both halves in one process,
no codec), the local path's own work besides the model (local minus that: codec, messages,
checks, which the split does too), and `split_over_model_paced_floor_plus_codec` (the split over
the model-paced floor plus that work: 1.0 where the split adds nothing to the floor) and
`split_overhead_over_model_paced_ms` / `train_overhead_model_paced_ms` (what is left: ours).

Prints one JSON object.

    python benchmarks/floor.py --repeats 5
    python benchmarks/floor.py --cifar10 data/cifar10 --repeats 5 --steps 30
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import struct
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from splitnet import codec, models, serde, wire
from splitnet.cloud_api import StepReply

import model_flags  # the sibling module: the model flags transport.py and inference.py share

SERVICE = "floor.Echo"
# bytes to answer, milliseconds to compute first, and the model's cloud half to run first: its work
# (NO_MODEL, INFER, TRAIN) on how many samples
_HEADER = struct.Struct("<QdBq")
NO_MODEL, INFER, TRAIN = 0, 1, 2
_SERVED: dict = {}  # --serve: the model's halves ("halves")


def _echo(request: bytes, context) -> bytes:
    down, busy_ms, work, samples = _HEADER.unpack_from(request)
    if work != NO_MODEL:
        _SERVED["halves"].cloud(work, samples)
    _compute(busy_ms)
    return bytes(down)


def _compute(ms: float) -> None:
    """Keep this thread computing for `ms` (small matrix products: torch releases the GIL, as the
    model's layers do). Nothing for 0: the back-to-back floor stays a bare echo."""
    if ms <= 0:
        return
    a = torch.ones(64, 64)
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        torch.mm(a, a)


def _echo_stream(requests, context):
    for request in requests:
        yield _echo(request, context)


class Halves:
    """The split's two halves doing their share of an inference request (cut `--infer-cut`, the
    8-channel bottleneck, eval mode) or of a training step (`--cut`, `--bottleneck`: forward,
    backward and an SGD step each side), with none of this project's transport, codec or checks:
    what `stream_model_paced` interleaves with the bare echo, and `alone_ms` runs in one process.
    Untrained and fed zeros: the time does not depend on the values."""

    def __init__(self, args: argparse.Namespace) -> None:
        splits = model_flags.load(args)
        self.input_shape, self.classes = splits.input_shape, splits.num_classes
        self.infer = models.build(models.SplitSpec(args.arch, args.infer_cut, self.classes, self.input_shape, 8,
                                                   args.width))
        self.infer.encoder.eval()
        self.infer.decoder.eval()
        self.train = models.build(models.SplitSpec(args.arch, args.cut, self.classes, self.input_shape,
                                                   args.bottleneck, args.width))
        self.edge_opt = torch.optim.SGD(self.train.encoder.parameters(), lr=1e-3, momentum=0.9)
        self.cloud_opt = torch.optim.SGD(self.train.decoder.parameters(), lr=1e-3, momentum=0.9)

    def edge(self, work: int, samples: int) -> None:
        pixels = torch.zeros(samples, *self.input_shape)
        if work == INFER:
            with torch.no_grad():
                self.infer.encoder(pixels)
            return
        features = self.train.encoder(pixels)
        self.edge_opt.zero_grad()
        features.backward(torch.full_like(features, 1e-3))
        self.edge_opt.step()

    def cloud(self, work: int, samples: int) -> None:
        if work == INFER:
            with torch.no_grad():
                self.infer.decoder(torch.zeros(samples, *self.infer.feature_shape))
            return
        features = torch.zeros(samples, *self.train.feature_shape, requires_grad=True)
        loss = torch.nn.functional.cross_entropy(self.train.decoder(features), torch.zeros(samples, dtype=torch.long))
        self.cloud_opt.zero_grad()
        loss.backward()
        self.cloud_opt.step()

    def alone_ms(self, work: int, samples: int, count: int) -> float:
        """Median milliseconds of both halves in this process, one after the other: the model alone,
        no codec, message or check (what the local path adds to this is its own work)."""
        times = []
        for i in range(count + 20):
            start = time.perf_counter()
            self.edge(work, samples)
            self.cloud(work, samples)
            if i >= 20:
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def serve(args: argparse.Namespace) -> int:
    """The echo server: prints its port, serves until killed. It holds the model's halves for the
    requests that ask it to run the cloud's."""
    _SERVED["halves"] = Halves(args)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=wire.server_options(64))
    handlers = {"Unary": grpc.unary_unary_rpc_method_handler(_echo),
                "Stream": grpc.stream_stream_rpc_method_handler(_echo_stream)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"floor listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()
    return 0


def message_sizes(args: argparse.Namespace, halves: Halves) -> dict[str, tuple[int, int]]:
    """Bytes up and down of each exchange, as the split's messages serialize (the features of
    `halves`' training and inference cuts)."""
    batch = args.batch_size
    zeros = torch.zeros(batch, *halves.train.feature_shape)
    up = serde.train_step_to_proto(serde.TrainStep("0" * 32, 1000, codec.encode(zeros, "fp32"), [9] * batch, 999))
    down = serde.train_result_to_proto(StepReply(zeros, 1.0, batch, False, 0.05, 1000, 1000, 1000), "fp32")
    sizes = {"train": (up.ByteSize(), down.ByteSize())}
    for n in args.infer_batches:
        request = serde.infer_request_to_proto(
            serde.InferRequest("0" * 32, 1000, codec.encode(torch.zeros(n, *halves.infer.feature_shape), "fp32")))
        reply = serde.prediction_to_proto(serde.Prediction(1000, torch.zeros(n, halves.classes)))
        sizes[f"infer batch {n}"] = (request.ByteSize(), reply.ByteSize())
    return sizes


def _request(up: int, down: int, busy_ms: float, work: int = NO_MODEL, samples: int = 0) -> bytes:
    return _HEADER.pack(down, busy_ms, work, samples) + bytes(max(0, up - _HEADER.size))


def round_trips(address: str, up: int, down: int, count: int, warmup: int, streaming: bool,
                busy_ms: float = 0.0, halves: Halves | None = None, work: int = NO_MODEL, samples: int = 0) -> dict:
    """`count` timed round trips (after `warmup`), one in flight: milliseconds p50 / mean / p99.
    `busy_ms`: the client computes this long before each request and the server before each
    answer (its share is taken off the times). `halves` (with `work` on `samples`): the client
    runs the edge's half before each request and the server the cloud's before each answer,
    both in the time: a whole request or step, as the split's are timed."""
    request = _request(up, down, busy_ms, work, samples)
    with grpc.insecure_channel(address, options=wire.grpc_options(64)) as channel:
        if streaming:
            call = channel.stream_stream(f"/{SERVICE}/Stream")
            pending: list = []
            cond = threading.Condition()

            def requests():
                while True:
                    with cond:
                        cond.wait_for(lambda: pending)
                        item = pending.pop()
                    if item is None:
                        return
                    yield item

            replies = call(requests())

            def once() -> None:
                with cond:
                    pending.append(request)
                    cond.notify()
                next(replies)
        else:
            unary = channel.unary_unary(f"/{SERVICE}/Unary")

            def once() -> None:
                unary(request)
        for _ in range(warmup):
            once()
        times = []
        for _ in range(count):
            _compute(busy_ms)
            start = time.perf_counter()
            if halves:
                halves.edge(work, samples)
            once()
            times.append((time.perf_counter() - start) * 1e3 - busy_ms)
        if streaming:
            with cond:
                pending.append(None)
                cond.notify()
    times.sort()
    return {"ms_p50": statistics.median(times), "ms_mean": statistics.fmean(times),
            "ms_p99": times[min(len(times) - 1, int(0.99 * len(times)))], "count": count,
            **({"busy_ms_each_side": busy_ms} if busy_ms else {})}


def _run_script(name: str, argv: list[str]) -> dict:
    """`benchmarks/NAME.py ARGV` in this process; the JSON it prints."""
    sys.path.insert(0, str(Path(__file__).parent))
    module = __import__(name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main(argv)
    return json.loads(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    model_flags.add(p)
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 64, --cifar10 128)")
    p.add_argument("--infer-cut", default=None, help="default block1 (digits) or pool2 (--cifar10)")
    p.add_argument("--infer-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--count", type=int, default=300, help="timed floor round trips per series")
    p.add_argument("--repeats", type=int, default=5, help="transport.py --repeats")
    p.add_argument("--steps", type=int, default=60, help="transport.py --steps")
    p.add_argument("--requests", type=int, default=100, help="inference.py --requests")
    args = p.parse_args(argv)
    model_flags.resolve(args)
    args.batch_size = args.batch_size or (128 if args.cifar10 else 64)
    args.infer_cut = args.infer_cut or ("pool2" if args.cifar10 else "block1")
    torch.set_num_threads(1)
    if args.serve:
        return serve(args)
    halves = Halves(args)
    sizes = message_sizes(args, halves)
    transport = _run_script("transport", [*model_flags.argv(args), "--batch-size", str(args.batch_size),
                                          "--steps", str(args.steps), "--repeats", str(args.repeats), "--pipeline", "2"])
    inference = _run_script("inference", [*model_flags.argv(args, "arch", "width"), "--bottleneck", "8",
                                          "--cuts", args.infer_cut, "--codecs", "fp32", "--links",
                                          "--batch-sizes", *map(str, args.infer_batches),
                                          "--requests", str(args.requests)])
    step = {name: 1e3 * args.batch_size / transport["samples_per_second"][name] for name in ("local", "split")}
    by_transport = inference["results"][args.infer_cut]["fp32"]
    local_ms = {"train": step["local"], **{f"infer batch {n}": by_transport["local"][f"batch {n}"]["latency_ms_p50"]
                                           for n in args.infer_batches}}
    work = {"train": (TRAIN, args.batch_size), **{f"infer batch {n}": (INFER, n) for n in args.infer_batches}}
    server = subprocess.Popen([sys.executable, __file__, "--serve", *model_flags.argv(args), "--infer-cut",
                               args.infer_cut], stdout=subprocess.PIPE, text=True)
    try:
        address = server.stdout.readline().split()[-1]  # type: ignore[union-attr]
        floor = {name: {"bytes_up": up, "bytes_down": down,
                        "stream": round_trips(address, up, down, args.count, 20, streaming=True),
                        "stream_paced": round_trips(address, up, down, args.count, 20, streaming=True,
                                                    busy_ms=local_ms[name] / 2),
                        "stream_model_paced": round_trips(address, up, down, args.count, 20, streaming=True,
                                                          halves=halves, work=work[name][0], samples=work[name][1]),
                        **({"unary": round_trips(address, up, down, args.count, 20, streaming=False)}
                           if name != "train" else {})}
                 for name, (up, down) in sizes.items()}
    finally:
        server.kill()
        server.wait()
    # What the local path does besides the model (codec, messages, checks), which the split does too.
    alone = {name: halves.alone_ms(*work[name], args.count) for name in sizes}
    besides = {name: local_ms[name] - alone[name] for name in sizes}
    model_paced = {name: floor[name]["stream_model_paced"]["ms_p50"] for name in sizes}
    infer = {}
    for n in args.infer_batches:
        name = f"infer batch {n}"
        local, split = (by_transport[t][f"batch {n}"]["latency_ms_p50"] for t in ("local", "loopback"))
        series = floor[name]
        best = min(series["stream"]["ms_p50"], series["unary"]["ms_p50"])
        paced = series["stream_paced"]["ms_p50"]
        infer[f"batch {n}"] = {"local_ms_p50": local, "split_ms_p50": split, "floor_ms_p50": best,
                               "floor_paced_ms_p50": paced, "split_over_floor_plus_local": split / (best + local),
                               "split_over_paced_floor_plus_local": split / (paced + local),
                               "model_alone_ms_p50": alone[name], "floor_model_paced_ms_p50": model_paced[name],
                               "split_over_model_paced_floor_plus_codec": split / (model_paced[name] + besides[name]),
                               "split_overhead_over_model_paced_ms": split - model_paced[name] - besides[name]}
    train_floor = {k: floor["train"][k]["ms_p50"] for k in ("stream", "stream_paced")}
    print(json.dumps({
        "model": {"dataset": "cifar10" if args.cifar10 else "digits", "arch": args.arch, "cut": args.cut or "default",
                  "width": args.width, "bottleneck": args.bottleneck, "infer_cut": args.infer_cut,
                  "batch_size": args.batch_size},
        "floor": floor, "transport": transport, "inference": by_transport,
        "train": {"local_step_ms": step["local"], "split_step_ms": step["split"],
                  "floor_ms_p50": train_floor["stream"], "floor_paced_ms_p50": train_floor["stream_paced"],
                  "train_overhead_ms": step["split"] - step["local"] - train_floor["stream"],
                  "train_overhead_paced_ms": step["split"] - step["local"] - train_floor["stream_paced"],
                  "model_alone_step_ms": alone["train"], "floor_model_paced_step_ms": model_paced["train"],
                  "split_over_model_paced_floor_plus_codec": step["split"] / (model_paced["train"] + besides["train"]),
                  "train_overhead_model_paced_ms": step["split"] - model_paced["train"] - besides["train"],
                  "lockstep_over_local": transport["ratio_split_over_local"],
                  "pipelined_over_local_2threads": transport.get("ratio_pipelined_over_local_2threads")},
        "infer": infer}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
