"""Security: who may read and write (tokens), from which sites (origins), and how much (limits)."""
