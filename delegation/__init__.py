"""The domain: OAuth client, vault (KMS envelope encryption), token source, revocation bus,
audit writer and the error tree.

May import `models`; never `worker`, `scheduler`, `api` or `behalf`.
"""
