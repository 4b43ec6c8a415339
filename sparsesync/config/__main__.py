"""``python -m sparsesync.config``: print the table of environment variables (the README's configuration table)."""
from . import markdown_table

print(markdown_table())
