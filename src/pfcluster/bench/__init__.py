"""Benchmarks behind `pfcluster bench`."""
