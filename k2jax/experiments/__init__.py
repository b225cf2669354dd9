"""Experiments built on the model, the engine and the environments: the test-time-scaling sweep (k2-tts)."""
