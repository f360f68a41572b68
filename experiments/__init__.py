"""The papers' experiments at testbed scale, as resumable stages that write committed records.

    python -m experiments run all --cache /path/to/cache     # every stage, resumable, with progress bars
    python -m experiments run accuracy --cache DIR           # one stage (and the stages it needs)
    python -m experiments report                             # every table, from experiments/records/
    python -m experiments report --write EXPERIMENTS.md      # fill the document's marked tables
    python -m experiments report --check EXPERIMENTS.md      # exit 1 where the document and records disagree

See experiments/README.md.
"""
