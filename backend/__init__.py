"""Reference backend: keys, issuing and publishing signed batches, collecting redemptions."""
