"""What goes out: every output declared in one place (``registry``), the outbox life their rows share
(``delivery``), the Structured Report (``sr``, ``srtemplate``, ``codes``, ``srfiles``) forwarded to the PACS
(``forward``), the HL7 ORU^R01 to the RIS (``hl7``: what it says in ``hl7report``, carried by ``mllp``) and the
priority as Orthanc metadata (``orthanc``).
"""
