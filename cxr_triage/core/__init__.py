"""Core: what every room stands on: the configuration (``config``, ``settings``, and the endpoint values they
name, ``endpoints``), the database (``db``, its row states in ``states``), named leases (``schedlock``), the
start-up of every command (``bootstrap``) and the once-per-change failure log (``failurelog``).
"""
