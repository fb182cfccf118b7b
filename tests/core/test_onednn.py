"""oneDNN's kernel cache is sized when lmcompress is imported, unless the user sized it."""

from __future__ import annotations

import os
import subprocess
import sys

from lmcompress.core.onednn import CAPACITY, CAPACITY_ENV, size_kernel_cache


def test_the_capacity_is_set_only_where_the_user_left_it_unset():
    assert size_kernel_cache({}) == str(CAPACITY)
    assert size_kernel_cache({CAPACITY_ENV: "64"}) == "64"


def test_importing_lmcompress_sets_it_before_any_kernel_runs():
    env = {k: v for k, v in os.environ.items() if k != CAPACITY_ENV}
    code = f"import os, lmcompress; print(os.environ['{CAPACITY_ENV}'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(CAPACITY)
