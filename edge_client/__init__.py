"""The edge half: runs the encoder F_e on private data and trains it through a remote decoder."""
