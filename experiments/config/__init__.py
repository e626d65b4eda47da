"""Configs: reading config files and command-line overrides (cli.py), the runner's defaults that files under
configs/ build on (defaults.py), and `config.quant` turned into qjax rules (quant.py)."""
