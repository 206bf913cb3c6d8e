"""Compression: exact projections onto compression sets (`projections`), the rules that say
which layer goes to which set (`rules`), ADMM over parameter pytrees (`admm`) and what a
compressed model takes to store (`size`). Pure functions over pytrees; no training loop."""
