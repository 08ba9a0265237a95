"""Scoring: conditions from the data in use, the shapes-v1 verifier, real-data metrics,
reconstruction figures, and `lit-vqdiff eval` over a sample folder."""
