"""The control plane: config, store, auth, the HTTP API and the CLI around the runtime."""

__version__ = "0.1.0"
