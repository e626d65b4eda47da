"""The README's Python examples run as written, pasted in order into a fresh interpreter."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(text: str) -> list[str]:
  """The ```python fenced blocks of a markdown text, in order."""
  return re.findall(r'^```python\n(.*?)^```', text, flags=re.S | re.M)


def test_readme_python_examples_run_in_order():
  blocks = python_blocks(open(os.path.join(ROOT, 'README.md')).read())
  assert len(blocks) >= 3
  script = '\n'.join(blocks)
  r = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT})
  assert r.returncode == 0, r.stderr[-3000:]
  assert 's8 x s8 -> s32' in r.stdout  # the ops example prints the int8 matmuls it found
  assert 'matched nothing' not in r.stdout  # the rules example's rules fit its models
