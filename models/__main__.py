"""python -m models: print the README's table of the twelve models, from the registry."""
from .registry import markdown_table

print(markdown_table())
