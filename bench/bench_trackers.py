"""Superseded by ``bench_step_share.py`` (six models, the issue-13 protocol).

Kept so that ``python bench/bench_trackers.py`` still works: it runs
``bench_step_share.py`` with the same arguments.
"""

from __future__ import annotations

from bench_step_share import main

if __name__ == "__main__":
    main()
