"""SQLite storage: schema and migrations, code cache, ledger, outbox, trust state.

One database file, WAL, synchronous=FULL. The engine is the only writer on the scan
path; a batch import takes the same write lock for one transaction.
"""
