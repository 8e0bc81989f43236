"""One module per ``cxr-triage`` subcommand (``cxr_triage.cli`` imports the chosen one by name): each defines
``add_arguments(parser)`` and ``run(args) -> int`` and starts through ``cxr_triage.core.bootstrap``.
"""
