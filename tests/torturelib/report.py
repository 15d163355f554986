"""The campaign's figures: one record per run (a seed, or a replayed
prefix), summed into a table for people and a dict for --json."""
import collections

INVARIANTS = (("wrong-read", "wrong reads"), ("lost-write", "lost acknowledged writes"),
              ("unexpected-eio", "unexpected EIOs"), ("hang", "hangs"))


def record(campaign, seconds):
    """What one finished Campaign contributes."""
    c, s = campaign, campaign.stats
    return {
        "seed": c.setup.seed, "setup": c.setup.describe(), "steps": s.steps,
        "seconds": round(seconds, 1), "workers": s.workers, "restarts": s.restarts,
        "late_faults": c.late_faults,
        "ops": dict(s.ops), "sectors_read": s.sectors_read,
        "faults": dict(s.faults, **({"kill -9": sum(s.crashes.values())} if s.crashes else {})),
        "crashes": dict(s.crashes), "resync": dict(s.resync),
        "eio_expected": s.eio_expected, "eio_raced": s.eio_raced,
        "excused_blocks": s.excused, "events": dict(s.events),
        "skipped": dict(s.skipped), "refused": dict(s.refused), "notes": dict(s.notes),
        "lives": [{"first": life.first, "last": life.last} for life in s.lives if life.first],
        "bursts": s.bursts, "late": s.late[-20:], "final": s.final,
        "violations": [v.to_dict() for v in c.violations],
        "workdir": c.dir,
    }


def total(records):
    out = {"seeds": len(records), "steps": 0, "seconds": 0.0, "ops": collections.Counter(),
           "faults": collections.Counter(), "sectors_read": 0, "eio_expected": 0,
           "eio_raced": 0, "excused_blocks": 0, "violations": collections.Counter(),
           "cycles": 0, "workers": 0, "resync": collections.Counter()}
    for r in records:
        for k in ("steps", "seconds", "sectors_read", "eio_expected", "eio_raced",
                  "excused_blocks", "workers"):
            out[k] += r[k]
        out["ops"].update(r["ops"])
        out["faults"].update(r["faults"])
        out["violations"].update(v["category"] for v in r["violations"])
        out["resync"].update(r.get("resync", {}))
        out["cycles"] += sum(b["done"] for b in r["bursts"])
    return out


def counts(counter):
    items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"{sum(counter.values())}: " + ", ".join(f"{k} {v}" for k, v in items) if items else "0"


def resources(r):
    """fds and RSS of the worker: per life (first and last status), and
    around each fail/readd burst, the largest growth of each."""
    lives = [life for life in r["lives"] if life["last"]]
    if not lives:
        return "no samples"

    def grew(a, b):
        return b["fds"] - a["fds"], (b["rss"] - a["rss"]) >> 20

    fds, rss = zip(*(grew(life["first"], life["last"]) for life in lives))
    most = max(lives, key=lambda life: life["last"]["cycles"])
    text = (f"{len(lives)} worker lives: fds grew at most {max(fds):+d}, RSS at most "
            f"{max(rss):+d} MiB; the life with the most cycles "
            f"({most['last']['cycles']}): fds {most['first']['fds']}->{most['last']['fds']}, "
            f"RSS {most['first']['rss'] >> 20}->{most['last']['rss'] >> 20} MiB")
    if r["bursts"]:
        worst = max(r["bursts"], key=lambda b: b["after"]["fds"] - b["before"]["fds"])
        text += (f"; bursts: {len(r['bursts'])}, the worst {worst['done']} cycles with fds "
                 f"{worst['before']['fds']}->{worst['after']['fds']}, RSS "
                 f"{worst['before']['rss'] >> 20}->{worst['after']['rss'] >> 20} MiB")
    return text


def live_resyncs(r):
    """What ran while a worker's resync did (campaign.py, resync_pace)."""
    text = (f"{r.get('starts', 0)} worker starts served during their resync "
            f"({r.get('paced', 0)} paced), {r.get('reads', 0)} reads sent meanwhile, "
            f"{r.get('kills', 0)} kill -9 during one; {r.get('torn blocks', 0)} blocks "
            "split by torn writes at kill -9")
    if r.get("failed, degraded"):
        text += f", {r['failed, degraded']} failed with fewer than threshold in service"
    return text


def figures(records, findings):
    """The table: totals, then each seed, then every finding."""
    t = total(records)
    lines = [f"torture campaign: {t['seeds']} run(s), {t['steps']} steps, "
             f"{t['seconds']:.0f} s, {t['workers']} worker processes",
             f"  ops checked      {counts(t['ops'])} ({t['sectors_read'] * 512 >> 20} MiB read "
             "and checked sector by sector)",
             f"  faults injected  {counts(t['faults'])}",
             f"  fail+readd       {t['cycles']} cycles",
             f"  live resyncs     {live_resyncs(t['resync'])}"]
    inv = " | ".join(f"{name} {t['violations'].get(cat, 0)}" for cat, name in INVARIANTS)
    other = {k: v for k, v in t["violations"].items() if k not in dict(INVARIANTS)}
    lines.append(f"  invariants       {inv} | other {counts(collections.Counter(other))}")
    lines.append(f"  allowed EIOs     {t['eio_expected']} where the damage left no quorum, "
                 f"{t['eio_raced']} racing a write; {t['excused_blocks']} blocks beyond the "
                 "budget after crashes")
    for r in records:
        status = "ok" if not r["violations"] else f"{len(r['violations'])} violation(s)"
        lines.append(f"seed {r['seed']}: {r['setup']}")
        lines.append(f"    {r['steps']} steps in {r['seconds']} s, {r['workers']} workers "
                     f"({r['restarts']} clean restarts; late faults: "
                     f"{'yes' if r['late_faults'] else 'no'}): {status}")
        lines.append(f"    resources: {resources(r)}")
        final = r["final"]
        if final:
            scrub = final.get("scrub")
            if isinstance(scrub, dict):
                scrub = (f"repaired {scrub['repaired']}, unrecoverable "
                         f"{scrub['unrecoverable']}")
            lines.append(f"    final: scrub {scrub}; {final.get('in_service')} in-service "
                         f"replicas {'byte-identical' if final.get('identical') else 'DIFFER'}")
        if r["skipped"]:
            lines.append(f"    skipped: {counts(collections.Counter(r['skipped']))}")
        if r["crashes"]:
            lines.append(f"    kill -9: {counts(collections.Counter(r['crashes']))}")
        if r["notes"]:
            lines.append(f"    notes: {counts(collections.Counter(r['notes']))}")
        if r["refused"]:
            lines.append(f"    refused: {counts(collections.Counter(r['refused']))}")
    lines.append("findings:" if findings else "findings: none")
    for f in findings:
        lines.append(f"  seed {f['seed']} step {f['step']}: {f['category']}: {f['detail']}")
        lines.append(f"    reproduce: {f['reproduce']}")
    return "\n".join(lines)
