"""pvcoord: client library, command line and demo beamline."""
