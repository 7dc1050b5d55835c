"""What the edge and the cloud agree on: models, data, the tensor codec and the wire."""
