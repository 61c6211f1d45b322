"""orderpipe benchmarks: `make bench`, `orderpipe bench`, `python -m bench.run`.

Every figure is measured in one run, on one broker binary, next to the raw client's ceiling
measured in that same run. See README.md, "Performance".
"""
