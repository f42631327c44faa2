"""Fixtures of the idempotency tests: private Redis and PostgreSQL servers."""

from support.databases import postgres_dsn, postgres_server, redis_server, redis_url

__all__ = ["postgres_dsn", "postgres_server", "redis_server", "redis_url"]
