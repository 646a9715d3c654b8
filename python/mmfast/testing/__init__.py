"""Builders of tiny random models (diffusers, transformers) shared by the tests, the
examples and the benchmarks: built locally from configs, nothing is downloaded."""
