"""Wire messages and small helpers the gRPC tests share: a valid session for the default
model (cnn cut at block1 on 16x16 digits) and valid training steps for it, to be broken
one field at a time."""

import socket
import time

import grpc
import pytest
import torch

from splitnet import codec
from splitnet.v1 import split_pb2 as pb

FEATURES = (32, 8, 8)  # cnn, cut block1, 16x16 input


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec(job: str, client: str = "c", **kw) -> pb.SessionSpec:
    fields = dict(job=job, client_id=client, arch="cnn", cut="block1", num_classes=10, input_shape=[1, 16, 16],
                  feature_shape=list(FEATURES), lr=0.05, momentum=0.9, grad_codec="fp32")
    return pb.SessionSpec(**{**fields, **kw})


def tensor(batch: int = 4, fill: float | None = None, name: str = "fp32") -> pb.Tensor:
    t = torch.rand(batch, *FEATURES) if fill is None else torch.full((batch, *FEATURES), fill)
    return codec.encode(t, name)


def step(sid: str, step_id: int = 1, features: pb.Tensor | None = None, labels: list[int] | None = None) -> pb.TrainStep:
    features = features if features is not None else tensor()
    n = features.shape[0] if features.shape else 0
    return pb.TrainStep(session_id=sid, step_id=step_id, features=features,
                        labels=labels if labels is not None else [i % 10 for i in range(max(n, 0))])


def rejected(call) -> grpc.RpcError:
    """The error `call()` fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def wait_until(condition, timeout: float = 10.0) -> bool:
    """Whether `condition()` came true within `timeout` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
