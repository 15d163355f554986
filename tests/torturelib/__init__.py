"""The seeded torture campaign behind tests/torture.py (issue 8, section 3).

One seed gives a schedule of steps, each a batch of load (reads, writes with
and without FUA, flushes, discards, write-zeroes from several threads) and
one thrasher action (bit flips, injected faults, replica changes, scrubs,
bitmap cleaning, kill -9 of the worker). A controller process owns the
schedule, the model of what each sector may hold, and the checks; a worker
process (worker.py) opens the replica set the way `quorumblk add` does
without the device and runs what the controller sends it, reporting every
operation's start and end over a pipe, so that killing it is a real crash.

    payload.py    self-describing sector contents (write id, sector, checksum)
    model.py      Versions (what a sector may hold), Damage (what the
                  thrasher did that the vote must survive)
    schedule.py   Setup, Batch, Action and Step, all derived from the seed
    protocol.py   the controller's end of the worker pipe
    worker.py     the worker process
    replicas.py   the replica image files: creating, flipping, auditing
    thrasher.py   turns an action into flips, commands and probes
    campaign.py   one run of a schedule: the loop and every invariant
    report.py     the figures table and the JSON summary
"""
