"""Scheduled retraining: the job (``retraining``), one run at a time per database, and its schedule inside ``serve``."""
