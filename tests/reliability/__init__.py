"""Reliability under faults and bad input: kill -9, full disks, NaN/Inf, bad configs, version and shape
mismatches, concurrent writers, a soak. Real processes and real files (tests.reliability.faults injects
the faults into the real command line)."""
