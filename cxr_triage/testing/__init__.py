"""Test support, shared by the test suite and the benchmarks (never imported by the runtime).

- ``synthetic``: synthetic chest radiographs (no patient data): displayed pictures, datasets and files;
- ``peers``: the real DICOM peers and servers the tests talk to (dcmtk, Orthanc, PostgreSQL, ``cxr-triage serve``).
"""
