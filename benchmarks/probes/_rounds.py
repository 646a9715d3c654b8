"""The probes' shared timing: contenders run once per round in a shuffled order (so the drifts
of a VM's bandwidth fall on all of them alike), and each is reported by its median time and the
median of its per-round ratios to a reference contender."""
import random
import statistics
import time


def time_rounds(contenders, rounds, shuffle=True):
    """{name: [seconds per round]} for {name: fn}; each round runs every fn once, in an order
    shuffled with the round's index as seed (or as given, with shuffle=False)."""
    times = {name: [] for name in contenders}
    for round_ in range(rounds):
        order = list(contenders.items())
        if shuffle:
            random.Random(round_).shuffle(order)
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def print_ratios(times, reference, nbytes, label):
    """One line per contender: median ms, GB/s over nbytes, median ratio to `reference`'s time
    in the same round ("{ratio}x {label}")."""
    width = max(len(name) for name in times)
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        ratio = statistics.median(a / b for a, b in zip(values, times[reference]))
        print(f"{name:{width}s} {ms:7.2f} ms  {nbytes / ms / 1e6:5.1f} GB/s  {ratio:.3f}x {label}")
