"""Transports: how a saved version reaches a subscriber (notifiers, long-poll, SSE, WebSocket)."""
