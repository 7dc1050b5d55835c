"""`edge-client --infer-only`: collaborative inference with a trained encoder, request by request, timed.

What a user of split inference waits for is one answer: the image through the encoder, the
obfuscation it trained with, the features over the wire, the cloud's decoder, the logits
back. Each request (one image, or `--infer-batch-size` of them) is sent only once the
previous one is answered, as an application waiting on its answers would, and timed from
the pixels to the logits. The cloud must hold the decoder of the encoder's job: the server
the encoder trained against, still running or restarted from its `--checkpoint-dir`; the
job defaults to the one the encoder file names.

Images come from a folder (every image file under it, any depth, resized to the encoder's
input) or, without `--images`, from the edge's dataset's test split, whose labels give an
accuracy too.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from edge_client.config import EdgeConfig
from edge_client.remote import CloudError, RemoteCloud
from edge_client.report import percentile
from splitnet import data, encoder_file, models
from splitnet.cloud_api import Cloud
from splitnet.obfuscation import Obfuscation
from splitnet.settings import DataSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferConfig:
    encoder: str  # a file of `edge-client --save-encoder`
    images: str = ""  # a folder of images; empty: the dataset's test split
    max_images: int = 0  # the first N (0: all)
    batch_size: int = 1  # images per request


def timed_requests(encode: Callable[[torch.Tensor], torch.Tensor], cloud: Cloud, batches: Iterable[torch.Tensor],
                   codec: str, channels: Sequence[int] | None = None) -> list[tuple[torch.Tensor, float]]:
    """(logits, milliseconds from pixels to logits) per batch, one request in flight at a time; `channels`:
    the only ones sent (an encoder that learned to prune the others)."""
    out = []
    for x in batches:
        start = time.perf_counter()
        (logits,) = list(cloud.infer([encode(x)], codec, channels))
        out.append((logits, (time.perf_counter() - start) * 1e3))
    return out


def latency_summary(latencies_ms: list[float], images: int, wall_s: float) -> dict:
    """The figures a latency report carries (README.md, "Collaborative inference")."""
    return {"requests": len(latencies_ms), "images": images,
            "latency_ms_p50": percentile(latencies_ms, 50), "latency_ms_p99": percentile(latencies_ms, 99),
            "latency_ms_mean": sum(latencies_ms) / len(latencies_ms) if latencies_ms else math.nan,
            "requests_per_second": len(latencies_ms) / wall_s if wall_s else 0.0,
            "images_per_second": images / wall_s if wall_s else 0.0}


def folder_images(folder: str, input_shape: tuple[int, int, int], limit: int = 0) -> tuple[list[str], torch.Tensor]:
    """The image files under `folder` (sorted paths relative to it; the first `limit` if given), as
    the encoder's input: grey or RGB by its channel count, resized to its side, values in [0, 1]."""
    from torchvision import transforms
    from torchvision.datasets.folder import IMG_EXTENSIONS
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {folder}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"--images {folder}: no image files ({', '.join(IMG_EXTENSIONS)}) in it")
    files = files[:limit or len(files)]
    channels, height, width = input_shape
    tf = transforms.Compose([transforms.Resize((height, width)), transforms.ToTensor()])
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"the encoder takes {channels}-channel input; images can be fed to 1 or 3 channels only")
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(tf(image.convert(mode)))
    return [str(p.relative_to(root)) for p in files], torch.stack(images)


def run(config: EdgeConfig, infer: InferConfig, cloud: RemoteCloud) -> dict:
    """Open a session on the encoder's job, time every request, close; return the report."""
    saved = encoder_file.read(infer.encoder)
    spec = saved.spec
    labels: torch.Tensor | None = None
    if infer.images:
        names, images = folder_images(infer.images, spec.input_shape, infer.max_images)
    else:
        test = data.load(DataSpec(config.data.name, config.data.data_root, config.data.download,
                                  config.data.image_size or spec.input_shape[-1])).test
        test = Subset(test, range(min(len(test), infer.max_images or len(test))))
        images, labels = next(iter(DataLoader(test, batch_size=len(test))))
        names = [str(i) for i in range(len(test))]
        if tuple(images.shape[1:]) != tuple(spec.input_shape):
            raise ValueError(f"the {config.data.name} images are {list(images.shape[1:])}, the encoder takes "
                             f"{list(spec.input_shape)}: pass the --image-size it trained with")
    job = config.job if config.job != EdgeConfig.job else (saved.job or config.job)
    obfuscate = Obfuscation.from_settings(saved.defense, generator=torch.Generator().manual_seed(config.seed + 1))
    client_id = config.client_id or f"infer-{time.time_ns():x}"
    cloud.open(job, client_id, saved.split, models.OptimSpec(), config.grad_codec, config.seed)
    try:
        if not cloud.session.job_steps_applied:  # type: ignore[union-attr]
            raise CloudError(None, f"job {job!r} on {config.connection.server} has applied no training step, so its "
                                   f"decoder is untrained: pass the --job the encoder trained with"
                                   + (f" (the file names {saved.job!r})" if saved.job and saved.job != job else ""))

        @torch.no_grad()
        def encode(x: torch.Tensor) -> torch.Tensor:
            return obfuscate(saved.split.encoder(x))

        batches = list(torch.split(images, infer.batch_size))
        start = time.perf_counter()
        answers = timed_requests(encode, cloud, batches, config.codec, obfuscate.channels)
        wall = time.perf_counter() - start
    finally:
        cloud.close()
    predictions = []
    for (logits, ms), batch_names in zip(answers, _chunks(names, infer.batch_size)):
        if saved.split.head is not None:  # a U-shaped split: the cloud answered its middle's output
            with torch.no_grad():
                logits = saved.split.head(logits)
        probabilities = logits.softmax(1)
        for name, p in zip(batch_names, probabilities):
            predictions.append({"image": name, "class": int(p.argmax()), "confidence": float(p.max()),
                                "latency_ms": ms})
    if labels is not None:
        for prediction, label in zip(predictions, labels.tolist()):
            prediction["label"] = label
    report = {**latency_summary([ms for _, ms in answers], len(predictions), wall),
              "batch_size": infer.batch_size, "codec": config.codec, "encoder": infer.encoder, "job": job,
              "server": config.connection.server, "session_id": cloud.session_id,
              "bytes_up": cloud.bytes_up, "bytes_down": cloud.bytes_down,
              "accuracy": (sum(p["class"] == p["label"] for p in predictions) / len(predictions)
                           if labels is not None else None),
              "predictions": predictions}
    return report


def _chunks(items: list, size: int) -> Iterable[list]:
    return (items[i:i + size] for i in range(0, len(items), size))


def summary(report: dict) -> str:
    lines = [f"{p['image']}\t{p['class']}\t{p['confidence']:.3f}\t{p['latency_ms']:.1f} ms"
             for p in report["predictions"]]
    accuracy = "" if report["accuracy"] is None else f", accuracy {report['accuracy']:.3f}"
    lines.append(f"{report['images']} images in {report['requests']} requests of {report['batch_size']}: latency "
                 f"p50 {report['latency_ms_p50']:.1f} ms, p99 {report['latency_ms_p99']:.1f} ms, "
                 f"{report['requests_per_second']:.1f} requests/s{accuracy}")
    return "\n".join(lines)
