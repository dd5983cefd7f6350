"""uro-recs: a recommendation sidecar serving LibRecommender models to uro over ZeroMQ."""

__version__ = "0.1.0"
