"""Routing: which engine serves a request. Routes (virtual models) with ordered candidates
and their conditions, the `auto` router's difficulty classifier, circuit breakers, fallback
before the first token, and remote OpenAI-compatible upstreams."""
