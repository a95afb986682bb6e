"""Stores: where pages live, and how a process learns that one changed.

- contract.py: the two seams above, `Store` and `Notifier` (typing.Protocols)
- engines.py: opens the store and notifier the settings ask for
- base.py: the save steps both engines share (versions, conflicts, keys, limits, presence)
- sqlite.py, postgres.py: the engines; sqlite_notify.py, postgres_notify.py: their wake-ups
- notify.py: the engine-independent fan-out to subscriptions
- forking.py: what a forked worker must not share with its parent
- writers.py: group commit; schema.py: the schemas and migrations
"""
