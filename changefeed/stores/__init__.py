"""Stores: where pages live (SQLite, PostgreSQL), their schemas and migrations, and the write queue."""
