"""First-party plugins, written against the same public hook specification as third-party ones."""
