"""Representational collapse: linear probes on frozen encoders, sequential and cyclic
task chains, and drift measures (Aghajanyan et al. 2021, Section 4)."""
