"""The merchant console (issue 15): `redeemd-backend console`, a web app on the backend
store for the operator who keeps it open all day.

    app.py      the Starlette app: routes, sessions, CSRF, roles
    auth.py     accounts (Argon2id), sessions, CSRF tokens, login rate limiting
    audit.py    the audit log of actions (who, what, when)
    fleet.py    the fleet page's rows: backend/boxes_view.py's entries sorted, filtered,
                searched and paged by a keyset cursor
    pages.py    the HTML (server-rendered, escaped in one place)
    metrics.py  /metrics in Prometheus text format
    schema.py   the console's tables (a backend/store.py migration step)
    cli.py      `redeemd-backend console` and `redeemd-backend user ...`

docs/console.md says how to run it behind a TLS reverse proxy and what each page shows.
Nothing is imported here, so backend/store.py can import schema.py without the app.
"""
