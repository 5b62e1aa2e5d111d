"""Benchmarks behind `make bench`: each writes flat `name.figure` keys into outputs/bench/results.json."""
