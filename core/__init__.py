"""The kernel every other package builds on: the wire protocol, configuration, logging, the
database access and schema, the model store's format, and small process helpers."""
