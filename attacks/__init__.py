"""Attacks that reconstruct the edge's private images from split-layer features.

Pure torch, so any side of the system (an eavesdropping proxy, a curious cloud, an
offline evaluation) can run them: the training-based inverse network, white-box rMLE,
and the query-free shadow-encoder attack, plus the metrics every report scores with.
Import them from their modules: the package itself imports nothing, so that the
`attacker` command line (attacks.cli) answers --help without loading torch.
"""
