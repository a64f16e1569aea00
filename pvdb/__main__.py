"""Print pvcoord's PV list as Markdown: ``python -m pvdb > docs/pvs.md``."""

from .catalog import markdown

print(markdown(), end="")
