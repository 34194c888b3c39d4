"""`python -m dtml_deploy` = the `dtml` command (for machines where the console script is not installed)."""

from dtml_deploy.cli import app

app(prog_name="dtml")
