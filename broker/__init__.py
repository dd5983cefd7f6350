"""The ZeroMQ broker: client front end, worker back end, control endpoint."""
