"""Experiment drivers, configs and datasets for qjax."""
