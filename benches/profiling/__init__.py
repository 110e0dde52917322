"""The parts of benches/worker_profile.py (`benches/run --profile SCENARIO`) beside its run: the report."""
