"""Scheduling: cron maths, claiming due slots, refresh sweep, parked-run re-queue.

May import `models` and `delegation`; never `worker`, `api` or `behalf`.
"""
