"""Scheduled retraining: the job (``retraining``), one run at a time per database, what it learns from
(``feedback``), its verdict (``decision``), its schedule inside ``serve`` (``scheduler``) and its runs as people
read them (``runs``)."""
