"""Running the service: ``serve``'s process (``server``), the periodic jobs (``housekeeping``), spool retention
(``retention``), and what monitoring reads: ``status``, ``/healthz`` (``health``), ``/metrics`` (``metrics``).
"""
