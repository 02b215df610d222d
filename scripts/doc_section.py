"""A section of BENCHMARKS.md written by a script other than scripts/bench (which keeps such
sections as they are): the machine facts it opens with, and its place between
`<!-- begin NAME -->` and `<!-- end NAME -->`."""

import datetime
import os
import platform


def loadavg():
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def machine_facts(load_before):
    """The date, the machine and the load average before (given) and now."""
    with open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "?")
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "load_before": load_before, "load_after": loadavg()}


def write_section(path, begin, end, new):
    """Put `new` (which starts with `begin` and ends with `end`) in place of the section in
    `path`, or at its end."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if begin in text:
        text = text[:text.index(begin)] + new + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    with open(path, "w") as handle:
        handle.write(text)
