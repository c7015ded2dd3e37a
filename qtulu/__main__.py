from qtulu.cli import entry

entry()
