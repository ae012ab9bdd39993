"""One module per training stage; `common` holds what they share. Stages never import each
other: the CLI imports the stage it runs."""
