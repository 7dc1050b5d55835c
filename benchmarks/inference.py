"""Collaborative inference latency: single images and small batches through `Infer`, local vs split,
per cut and codec, on loopback and through emulated links.

For each cut the encoder runs here, and the decoder (a) in this process (`local`: `LocalCloud`,
the same job, messages and codec minus gRPC: the whole model on the device) or (b) in a real
`cloud-server` process, reached straight over loopback (`loopback`) and through a `split-link`
process of each `--links` profile (`--links` with none: local and loopback alone, as
`floor.py` times them, since an emulated link's requests between theirs leave both sides'
caches cold). Requests go one at a time, each timed from the pixels to the
logits (`edge_client.infer.timed_requests`, what `edge-client --infer-only` does), the
transports taking turns request by request, so that other load on the machine falls on all of
them alike; the first `--warmup` requests of each are dropped. The model is untrained: latency
does not depend on the weights. One torch thread here and in the server. The model is the
digits cnn (bottleneck 8, as in the example sweeps), or with `--cifar10 DIR` the converged
CIFAR-10 study's (`model_flags.py`; cuts default to its pool2).

Prints one JSON object: `links` (each profile's numbers) and `results[cut][codec][transport]
["batch N"]` = `latency_ms_p50`, `latency_ms_p99`, `latency_ms_mean`, `requests_per_second`,
`images_per_second`, `bytes_up_per_request`, `bytes_down_per_request`, plus
`split_over_local_p50[cut][codec]["batch N"][transport]`: the split's median latency over the
local one's.

    python benchmarks/inference.py --cuts conv1 block1 block2 --codecs fp32 int8 --batch-sizes 1 8 \\
        --links constrained wifi --requests 40
    python benchmarks/inference.py --cifar10 data/cifar10 --codecs fp32 --links constrained
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid

import torch

from cloud_server.local import LocalCloud
from deploy.link_profiles import PROFILES
from deploy.processes import start_process, start_server
from edge_client.config import ConnectionConfig
from edge_client.infer import latency_summary, timed_requests
from edge_client.remote import RemoteCloud
from splitnet import models

import model_flags  # the sibling module: the model flags transport.py and floor.py share


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_flags.add(p, cut=False)
    p.add_argument("--cuts", nargs="+", default=None, help="default conv1 block1 block2 (digits) or pool2 (--cifar10)")
    p.add_argument("--codecs", nargs="+", default=["fp32", "int8"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--links", nargs="*", default=["constrained", "wifi"], choices=sorted(PROFILES),
                   help="emulated links to time beside loopback (none: loopback alone)")
    p.add_argument("--requests", type=int, default=40, help="timed requests per series")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests first")
    args = model_flags.resolve(p.parse_args(argv), bottleneck=8)
    args.cuts = args.cuts or (["pool2"] if args.cifar10 else ["conv1", "block1", "block2"])
    torch.set_num_threads(1)

    splits = model_flags.load(args)
    images = torch.stack([x for x, _ in splits.test])
    server = start_server(fork=False)
    relays = {}
    try:
        for name in args.links:
            relays[name] = start_process(["deploy.link", "--upstream", server.address, "--profile", name],
                                         r"listening on (\S+) ->", fork=False)
        transports = {"local": "", "loopback": server.address, **{n: r.address for n, r in relays.items()}}
        results: dict = {}
        for cut in args.cuts:
            split = models.build(models.SplitSpec(args.arch, cut, splits.num_classes, splits.input_shape,
                                                  args.bottleneck, args.width))
            split.encoder.eval()
            encode = torch.no_grad()(split.encoder)
            job = f"bench-{cut}-{uuid.uuid4().hex[:6]}"
            clouds = {t: RemoteCloud(ConnectionConfig(server=address)) if address else LocalCloud()
                      for t, address in transports.items()}
            try:
                for transport, cloud in clouds.items():
                    cloud.open(job, f"{transport}-{uuid.uuid4().hex[:6]}", split, models.OptimSpec(), "fp32", 0)
                for codec in args.codecs:
                    for size in args.batch_sizes:
                        for transport, series in _series(encode, clouds, images, size, codec, args).items():
                            results.setdefault(cut, {}).setdefault(codec, {}).setdefault(transport, {})[
                                f"batch {size}"] = series
            finally:
                for cloud in clouds.values():
                    cloud.close()
    finally:
        for relay in relays.values():
            relay.stop()
        server.stop()
    ratios = {cut: {codec: {f"batch {size}": {t: by_t[t][f"batch {size}"]["latency_ms_p50"]
                                              / by_t["local"][f"batch {size}"]["latency_ms_p50"]
                                              for t in transports if t != "local"} for size in args.batch_sizes}
                    for codec, by_t in by_codec.items()} for cut, by_codec in results.items()}
    print(json.dumps({"arch": args.arch, "bottleneck": args.bottleneck, "width": args.width,
                      "dataset": "cifar10" if args.cifar10 else "digits", "requests": args.requests,
                      "warmup": args.warmup, "torch_threads": torch.get_num_threads(),
                      "links": {name: PROFILES[name].as_dict() for name in args.links},
                      "results": results, "split_over_local_p50": ratios}, indent=2))
    return 0


def _series(encode, clouds: dict, images: torch.Tensor, size: int, codec: str, args: argparse.Namespace) -> dict:
    """`args.warmup` + `args.requests` requests of `size` images to each cloud, the clouds taking
    turns; per cloud the timed ones summarised (requests/s: one request in flight, back to back)."""
    batches = [images[(i * size) % (len(images) - size):][:size] for i in range(args.warmup + args.requests)]
    for batch in batches[:args.warmup]:
        for cloud in clouds.values():
            timed_requests(encode, cloud, [batch], codec)
    before = {t: (cloud.bytes_up, cloud.bytes_down) for t, cloud in clouds.items()}
    latencies: dict[str, list[float]] = {t: [] for t in clouds}
    for batch in batches[args.warmup:]:
        for t, cloud in clouds.items():
            latencies[t] += [ms for _, ms in timed_requests(encode, cloud, [batch], codec)]
    out = {}
    for t, cloud in clouds.items():
        summary = latency_summary(latencies[t], size * args.requests, sum(latencies[t]) / 1e3)
        out[t] = {**{k: v for k, v in summary.items() if k not in ("requests", "images")},
                  "bytes_up_per_request": (cloud.bytes_up - before[t][0]) / args.requests,
                  "bytes_down_per_request": (cloud.bytes_down - before[t][1]) / args.requests}
    return out


if __name__ == "__main__":
    sys.exit(main())
