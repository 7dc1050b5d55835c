"""The cloud half: runs the decoder F_d for many edge sessions over gRPC."""
