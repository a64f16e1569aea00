"""The demo beamline: a real softIoc with simulated devices plus every pvcoord process."""
