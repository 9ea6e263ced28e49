from beear.cli import entry

entry()
