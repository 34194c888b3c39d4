"""`python -m dtml_deploy` = the `dtml` command (for machines where the console script is not installed);
as a rank of `dtml-torchrun` it hands its exit code to the launcher (dtml_deploy/launch.py)."""

from dtml_deploy.cli import app
from dtml_deploy.launch import run_rank

run_rank(lambda: app(prog_name="dtml"))
