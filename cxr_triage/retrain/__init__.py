"""Scheduled retraining: the job (``retraining``), one run at a time per database, what it learns from
(``feedback``), its schedule inside ``serve`` (``scheduler``) and its runs as people read them (``runs``); its
verdict is the shipping rule of ``cxr_triage.ml.decision``."""
