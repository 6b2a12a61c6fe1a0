from jsonargparse import CLI

from evals.run import main

if __name__ == "__main__":
    CLI(main, as_positional=False)
