"""How redeemd's processes run: owned threads, retry backoff and the command-line
scaffold both CLIs share (no domain here, nothing of ours imported)."""
