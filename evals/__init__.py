"""The Tulu benchmark suite (imported as ``qtulu.evals``)."""
