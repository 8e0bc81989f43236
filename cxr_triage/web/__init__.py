"""The radiologists' worklist: a web page and a JSON API over the database (``cxr-triage web``).

- ``worklist``: the queries (studies by priority, a study with its instances, feedback, the training export);
- ``auth``: users with argon2-hashed passwords, sessions, CSRF tokens, allowed networks, the audit trail;
- ``app``: the FastAPI application, its Jinja2 pages and its routes.
"""
