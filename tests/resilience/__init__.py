"""Resilience: faults survived, hostile input refused, no secret anywhere, least privilege."""
