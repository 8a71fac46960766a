"""Only the optional C speed-ups live here; everything else is in pyproject.toml.

``optional=True``: where no compiler is present the build warns and goes on, and
kitewire/encoder.py and consumers/payloads.py run their pure-Python paths, with the same
output.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kitewire._speedups",
            ["kitewire/_speedups.c"],
            optional=True,
            # No fused multiply-add: the price and change arithmetic must round exactly as Python's.
            extra_compile_args=["-O2", "-ffp-contract=off"],
        ),
        Extension(
            "consumers._speedups", ["consumers/_speedups.c"], optional=True, extra_compile_args=["-O2"]
        ),
    ]
)
