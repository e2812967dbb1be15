"""The error tree. Every class says whether retrying can help; none carries a secret.

    BehalfError
    ├── RetryableError (retry_after)        try again later, nothing was changed
    │   ├── KmsUnavailable                  KMS throttled, down or timed out
    │   ├── ProviderUnavailable             AS/API 5xx, 429, timeout, temporarily_unavailable
    │   └── BudgetExhausted                 our own per-provider/agent rate budget is spent
    ├── VaultError
    │   ├── SealedDataInvalid               tampered, truncated or moved ciphertext
    │   ├── KeyDestroyed                    crypto-shredded: gone for good
    │   └── UnknownKey                      the KMS key does not exist or is disabled
    ├── ReauthRequired                      invalid_grant: only the user can fix it
    ├── AgentMisconfigured                  invalid_client / unauthorized_client: operators fix it
    ├── ProviderError                       any other refusal by the AS (not retryable)
    └── DelegationUnusable                  revoked or broken: stop at once
        └── RunCancelled                    the run was told to stop
"""

from __future__ import annotations


class BehalfError(Exception):
    """Base of every error behalf raises on purpose."""

    retryable = False


class RetryableError(BehalfError):
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class KmsUnavailable(RetryableError):
    pass


class ProviderUnavailable(RetryableError):
    """`unanswered` is True when the request may have been processed but no answer came back
    (a timeout or dropped connection after sending), as opposed to an explicit 5xx/429."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 unanswered: bool = False) -> None:
        super().__init__(message, retry_after=retry_after)
        self.unanswered = unanswered


class VaultError(BehalfError):
    pass


class SealedDataInvalid(VaultError):
    pass


class KeyDestroyed(VaultError):
    pass


class UnknownKey(VaultError):
    pass


class ReauthRequired(BehalfError):
    """The AS answered `invalid_grant`: the refresh token is dead; the user must consent again."""


class AgentMisconfigured(BehalfError):
    """The AS refused the agent's client (`invalid_client`); no user's delegation is at fault."""


class ProviderError(BehalfError):
    """The AS refused a request for a reason neither retryable nor the user's to fix."""


class DelegationUnusable(BehalfError):
    """The delegation is revoked or broken; no token may be used for it any more."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RunCancelled(DelegationUnusable):
    pass
