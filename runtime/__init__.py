"""How redeemd's long-running parts run: owned threads and retry backoff (no domain here)."""
