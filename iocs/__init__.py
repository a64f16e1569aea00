"""pvcoord IOCs: soft IOCs served with p4p (each a ``python -m`` entry point)."""
