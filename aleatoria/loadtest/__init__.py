"""Load-test tool for servers that speak the Aleatoria protocol (issue 4).

Entry points: ``aleatoria-loadtest``, ``python -m aleatoria.loadtest`` and
``python scripts/loadtest.py`` (same program, ``cli.main``). Programmatic use inside a
trio run: ``inline.run_inline(options)``. Module map, outside in:

- ``cli``: flags → ``Options``; output; exit status.
- ``options``: the run's knobs and safety rails (loopback only, bounded).
- ``coordinator``: worker threads/processes, Ctrl-C, merging; ``worker``: one trio run.
- ``scenarios``: fanout, dm, match, conns, soak, search (built from parts; match and search
  share ``scenarios.driven``: users run by a state machine with a deadline); ``client``: one
  connection; ``flow``: windows and pacing; ``context``: phases and the stop signal.
- ``payload``, ``tracking``, ``histogram``, ``stats``: the pure measuring core.
- ``results`` (what a run hands to the reports), ``summary`` (figures, warnings, exit
  status), ``report`` (table, JSON), ``progress`` (live display), ``plot`` (PNG),
  ``procstat`` (server CPU/RSS from /proc); ``inline`` runs a test in the caller's trio run;
  ``searchcheck``: the search scenario's profiles and its run-wide checks (fairness…).

Documentation: docs/loadtest.md.
"""
