"""Generated protobuf and gRPC code for the twinroute.v1 contract (see scheduler.proto).

Regenerate with `python tools/gen_proto.py`; CI checks that the committed files are current.
"""
