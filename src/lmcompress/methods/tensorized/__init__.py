"""Structured tensor factorisations: Kronecker sums and tensor trains, plain and whitened."""
