"""Bad inputs run against the entry points: the probe table (cases.py) and its runner
(runner.py); `python -m tests.probes` from the repository root runs them."""
