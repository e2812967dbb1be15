"""The HTTP app: connect, callback, grants, re-auth, ops, health and metrics.

May import `models` and `delegation`; never `worker`, `scheduler` or `behalf` (they meet in the
database, in task names and on the revocation bus).
"""
