"""Datasets for the experiments: Fashion-MNIST, MNIST and the complete works of Shakespeare.

Command line (run from the repository root)::

  python -m experiments.data fetch [fashion_mnist|mnist|shakespeare|all ...] [--force] [--sources KINDS]
  python -m experiments.data info
  python -m experiments.data make-fixtures [--out DIR]

"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import fileio
from experiments.config import cli as config_cli
from experiments.data.datasets import (
  info,
  make_fixtures,
)
from experiments.data.files import (
  DATASETS,
  FIXTURE_SHA256,
  FIXTURES_DIR,
  SOURCE_KINDS,
  DataError,
)
from experiments.data.sources import (
  Attempt,
  fetch_with_report,
  unavailable_message,
)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; a mistake (an unknown name, a dataset no source delivers) is one `error:` line and its
  fix steps, never a traceback (config_cli.main_guard)."""
  return config_cli.main_guard(_main, DataError, argv=argv)


def _main(argv: Sequence[str]) -> int:
  parser = config_cli.ArgParser(prog='python -m experiments.data', description=(__doc__ or '').split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p_fetch = sub.add_parser('fetch', help='get datasets into the cache (sha256 verified)')
  p_fetch.add_argument('names', nargs='*', default=['all'], metavar='NAME',
                       help=f'{", ".join(DATASETS)} or all (default: all)')
  p_fetch.add_argument('--force', action='store_true', help='ignore the cache and fetch again')
  p_fetch.add_argument('--sources', default=','.join(SOURCE_KINDS),
                       help=f'comma-separated source kinds to try, in their fixed order (default: all of '
                       f'{",".join(SOURCE_KINDS)})')
  sub.add_parser('info', help='print what is cached')
  p_fix = sub.add_parser('make-fixtures', help='regenerate tests/fixtures from the full data')
  p_fix.add_argument('--out', type=Path, default=FIXTURES_DIR)
  args = parser.parse_args(argv)

  if args.command == 'info':
    print(info())
    return 0
  if args.command == 'make-fixtures':
    try:
      hashes = make_fixtures(args.out)
    except DataError as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    same = hashes == FIXTURE_SHA256
    for name, pins in hashes.items():
      for f, sha in pins.items():
        print(f'{name}/{f}  {sha}')
    print(f'wrote fixtures to {args.out} ({fileio.dir_bytes(args.out) / 1e3:.0f} kB); content '
          + ('matches the pins in FIXTURE_SHA256' if same else 'DIFFERS from FIXTURE_SHA256: update the pins'))
    return 0

  names = list(DATASETS) if 'all' in args.names else args.names
  for n in names:
    if n not in DATASETS:
      parser.error(f'unknown dataset name {n!r}{config_cli.did_you_mean(n, DATASETS)} (allowed names: '
                   f'{", ".join(DATASETS)}, all)')
  kinds = [k.strip() for k in args.sources.split(',') if k.strip()]
  bad = [k for k in kinds if k not in SOURCE_KINDS]
  if bad:
    parser.error(f'unknown source kinds {bad}; allowed: {", ".join(SOURCE_KINDS)}')
  failed = []
  report: list[Attempt] = []
  for n in names:
    target, attempts = fetch_with_report(n, force=args.force, kinds=kinds)
    report += attempts
    if target is None:
      failed.append(n)
      print(unavailable_message(n, attempts), file=sys.stderr)
  print('\nsummary:')
  for a in report:
    print(f'  {a.dataset:14s} {a.status:8s} {a.seconds:7.2f} s  {a.label}')
  if failed:
    print(f'FAILED: {", ".join(failed)} (see the messages above)', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
