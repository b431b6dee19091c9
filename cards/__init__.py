"""Pure domain of redeemd: codes, signatures, batches and card rules.

Nothing here does I/O or imports another redeemd package, so every decision the box
makes about a code can be tested from plain values.
"""
