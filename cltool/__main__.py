"""``python -m cltool`` is ``cl``."""

from cltool.cli import app

app(prog_name="cl")
