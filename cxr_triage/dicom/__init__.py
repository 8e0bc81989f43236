"""DICOM networking: the C-STORE SCP (``listener``) behind its guard (``guard``), and the C-STORE sender (``scu``)."""
