"""The Python API in one screen: train a split model in-process, then attack its features.

    python examples/python_api.py                      # digits, int8 features, Gaussian noise 0.1
    python examples/python_api.py --epochs 1 --attack-epochs 1 --noise 0

`LocalCloud` runs the cloud's half in this process through the same messages and codec
as `cloud-server` (swap in `edge_client.remote.RemoteCloud(config.connection)` to train
against a real server). The attacker is the white-box one (it holds the trained encoder,
as someone who unpacks the device would) and knows the defense's settings, so it trains
its inverse network on features obfuscated the same way (noise-aware), though not with
the edge's random draws.
"""

from __future__ import annotations

import argparse

import torch

from attacks.config import AttackConfig
from attacks.metrics import score
from attacks.runner import Attacker
from cloud_server.local import LocalCloud
from edge_client.config import DefenseConfig, EdgeConfig
from edge_client.trainer import EdgeTrainer
from splitnet import data
from splitnet.obfuscation import Obfuscation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of the split model")
    parser.add_argument("--attack-epochs", type=int, default=20, help="training epochs of the inverse network")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the edge's Gaussian noise on its features")
    parser.add_argument("--codec", default="int8", help="wire codec of features and gradients")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small models: more threads only contend (README, "Why one torch thread per process")

    # Train: the encoder here, the decoder in the in-process cloud, features through the codec.
    splits = data.load(data.DataSpec("digits"))
    config = EdgeConfig(epochs=args.epochs, codec=args.codec, grad_codec=args.codec,
                        defense=DefenseConfig(noise=args.noise), progress=False)
    edge = EdgeTrainer(config, LocalCloud(), splits)
    edge.open()
    for _ in range(config.epochs):
        edge.train_epoch()
    accuracy = edge.evaluate()
    edge.close()
    print(f"test accuracy {accuracy:.3f} ({args.codec} features, noise {args.noise:g}, {args.epochs} epochs)")

    # Attack: learn to invert the encoder on auxiliary images, then invert what the edge sends.
    attacker = Attacker(AttackConfig("inversion", epochs=args.attack_epochs, progress=False), edge.split.spec,
                        splits.train, encoder=edge.encoder, obfuscate=Obfuscation(config.defense.obfuscation)).fit()
    images = torch.stack([x for x, _ in splits.test])
    recon = attacker.reconstruct(edge.encode(images))
    metrics = score(recon, images)
    print(f"inversion attack on {len(images)} test images: MSE {metrics['mse']:.4f}  SSIM {metrics['ssim']:.3f}  "
          f"PSNR {metrics['psnr']:.2f} dB")


if __name__ == "__main__":
    main()
