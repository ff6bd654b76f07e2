"""The one compiled part of radnet-node: the C-STORE receive loop (radnet_node/_fastscp.c).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built (no C
compiler or no Python headers) the install goes on and the node receives with its Python loop,
which gives the same results more slowly (``radnet-node serve`` logs which loop it runs).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "radnet_node._fastscp",
            ["radnet_node/_fastscp.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE"],
        )
    ]
)
