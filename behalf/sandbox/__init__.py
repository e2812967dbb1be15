"""A toy OAuth AS + resource API for `behalf dev`; imports no other package of ours.

`create_sandbox(...)` returns a `Sandbox`: two ASGI apps (the authorisation server and the
"SaaS API", served on two ports so they are two origins, as in real life) and the Python
methods the dev UI and tests use (`break_grants`, `grants`, `api_calls`). The protocol work is
done by Authlib's server components; this package only stores state (SQLite via SQLAlchemy, its
own metadata) and adapts Authlib to Starlette. Nothing here is fit for production: it exists so a
newcomer can try behalf with nothing installed.

Layout: `store` (tables and the only code that touches them), `users` (the demo people),
`server` (Authlib wired to the store, plus its Starlette adapter), `auth_app` and `api_app`
(the two HTTP apps), `pages` (HTML), `sandbox` (the factory and the `Sandbox` handle).
"""

from behalf.sandbox.sandbox import Sandbox, create_sandbox
from behalf.sandbox.store import ApiCall, GrantInfo
from behalf.sandbox.users import DEMO_PASSWORD, DEMO_USERS, DemoUser

__all__ = [
    "DEMO_PASSWORD",
    "DEMO_USERS",
    "ApiCall",
    "DemoUser",
    "GrantInfo",
    "Sandbox",
    "create_sandbox",
]
