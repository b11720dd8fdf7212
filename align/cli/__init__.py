"""Entry points: the recipes and pipeline command lines, and the `align` adapter lifecycle CLI."""
