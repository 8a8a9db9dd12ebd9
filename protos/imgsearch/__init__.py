"""The imgsearch wire contract and the gRPC plumbing every service shares.

``imgsearch.v1`` is generated from ``protos/imgsearch/v1/*.proto`` (do not edit it; ``make proto``).
``imgsearch.errors`` and ``imgsearch.serving`` are hand-written and shared by the broker and shard servers.
"""
