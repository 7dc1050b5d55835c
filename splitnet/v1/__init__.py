"""Generated from proto/splitnet/v1 by `python -m splitnet.protogen`; never edit by hand."""
