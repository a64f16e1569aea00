"""pvcoord tests: in-process (p4p isolated server) and system tests (real processes)."""
