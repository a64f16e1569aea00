"""pvcoord bridges: gateway and protocol bridges in front of the IOCs (each ``python -m``)."""
