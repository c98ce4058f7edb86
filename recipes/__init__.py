"""One folder per paper: model.py (the method), train.py (the CLI), configs/, README.md."""
