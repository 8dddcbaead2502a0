"""The benchmarks: each file is a script (``python bench/<name>.py``); helpers they share live
beside them in this package."""
