"""The attacker's inverse network, under the name it has always been imported by.

The network itself lives in `splitnet.inverse_models`, since the edge trains the same kind of
network as its simulated attacker (`edge_client.adversarial`) and no role imports another.
"""

from splitnet.inverse_models import InversionDecoder, upsampling_stages

__all__ = ["InversionDecoder", "upsampling_stages"]
