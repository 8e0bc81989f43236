"""Triage: a worker's loop (``worker``) through the stages (``pipeline``), the recorder that commits outcomes and
hands them to the outputs (``recorder``), the priority rules (``flags``) and the study aggregate (``studies``).
"""
