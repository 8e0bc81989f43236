"""The queue: spool files (``spool``) and the job queue over the ``instances`` table (``jobqueue``): every state
change of a job.
"""
