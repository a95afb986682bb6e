"""Operations: what every layer reports to (logs, metrics) and the gunicorn worker that runs it all."""
