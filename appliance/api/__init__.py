"""The HTTP API: OpenAI-compatible /v1, admin /admin, health and readiness."""
