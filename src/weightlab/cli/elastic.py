"""``weightlab elastic``: supernets, learngenes and generated weights. The apps live here; each method's
commands are in its own module (elastic_bignas, elastic_learngene, elastic_d2nwg) and register on them."""
from __future__ import annotations

import typer

from . import app

elastic_app = typer.Typer(help="Elastic weights: BigNAS supernets and their children, Learngene expansion, "
                               "D2NWG weight generation.", no_args_is_help=True)
train_app = typer.Typer(help="Train an elastic model: a BigNAS supernet, a learngene, a D2NWG generator.",
                        no_args_is_help=True)
elastic_app.add_typer(train_app, name="train")
app.add_typer(elastic_app, name="elastic")

from . import elastic_bignas, elastic_d2nwg, elastic_learngene  # noqa: E402,F401  (commands register on the apps)
