"""The code a run or a benchmark ran: the git commit of the qjax checkout and whether it had local changes, read
once when this module is first imported (with the rest of the code a process runs: a long-lived sweep worker
reports the code it loaded, not a later checkout).

result.json's `environment.code` and the benchmarks' machine table carry it, so a figure can be traced to a commit.
"""

from __future__ import annotations

import os
import subprocess

import qjax


def code_version(path: str | None = None) -> dict[str, object]:
  """{'commit': 40 hex digits, 'dirty': tracked files differ from it} of the git checkout holding `path` (default:
  the qjax package's); {} where that is no git checkout (an installed wheel) or git is missing."""
  where = path or os.path.dirname(os.path.dirname(os.path.abspath(qjax.__file__)))
  try:
    git = lambda *a: subprocess.run(['git', '-C', where, *a], capture_output=True, text=True, timeout=10,
                                    check=True).stdout.strip()
    commit = git('rev-parse', 'HEAD')
    dirty = bool(git('status', '--porcelain', '--untracked-files=no'))
  except (OSError, subprocess.SubprocessError):
    return {}
  return {'commit': commit, 'dirty': dirty}


CODE = code_version()
