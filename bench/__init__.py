"""The fusedlayers microbenchmark harness: `python -m bench --help`."""
