from bnaudit.cli import entry

entry()
