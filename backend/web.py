"""Serving the backend's web apps (the claim service, the console) behind a TLS proxy."""

from __future__ import annotations

from typing import Any


def serve(app: Any, host: str, port: int, forwarded_allow_ips: str) -> None:
    """Run `app` until stopped. No access log: a request line would carry a claim code
    (the customer's) or the search terms an operator typed (docs/decisions.md, "No codes
    in logs"). The proxy's X-Forwarded-* headers are believed only from
    `forwarded_allow_ips`."""
    import uvicorn  # the web extra: only the commands that serve need it

    uvicorn.run(
        app,
        host=host,
        port=port,
        access_log=False,
        log_level="warning",
        proxy_headers=True,
        forwarded_allow_ips=forwarded_allow_ips,
    )
