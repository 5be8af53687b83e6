"""Thin DVC stage entry points: parse args, load config, call pipeline/."""
