"""Performance benchmarks: ``python -m benchmarks.run`` (see the README's Performance section).

Kept out of the test suite on purpose: no test asserts a time. Every target is a
ratio measured inside one run, or an absolute time quoted only where stated.
"""
