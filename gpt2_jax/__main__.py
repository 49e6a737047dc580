"""`python -m gpt2_jax` runs the gpt2-jax command line."""

from gpt2_jax.cli import main

main()
