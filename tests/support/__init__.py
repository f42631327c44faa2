"""Helpers shared by the integration tests: certificates, NATS JWTs, CLI runs."""
