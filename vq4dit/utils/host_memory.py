"""Which host tensors are mapped from files (Linux /proc), and this process's memory split into private and shared.

A tensor loaded from a safetensors file in the dtype the file stores is a view of the file's pages (safetensors
maps the file; diffusers and `load_state_dict(assign=True)` keep the tensors they are given). Those pages live in
the page cache, once per machine, however many processes map them: torchrun's processes that each load the same
checkpoint share one copy. A tensor converted on load (bf16 -> fp32) is private memory of each process.
"""
import bisect


def _file_ranges():
    """[(start, end)] of this process's mappings of regular files (/proc/self/maps; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = [line.split() for line in f]
    except OSError:
        return []
    ranges = []
    for fields in lines:
        if len(fields) >= 6 and fields[5].startswith("/") and fields[4] != "0":  # a path and an inode: a file
            start, end = (int(v, 16) for v in fields[0].split("-"))
            ranges.append((start, end))
    return sorted(ranges)


def mapped_bytes(tensors):
    """Bytes of the distinct storages of CPU `tensors` that lie in a file mapping of this process (0 off Linux)."""
    ranges = _file_ranges()
    starts = [lo for lo, _ in ranges]
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if t.device.type != "cpu" or storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        i = bisect.bisect_right(starts, start) - 1  # the last mapping that begins at or before the storage
        if i >= 0 and end <= ranges[i][1]:
            total += storage.nbytes()
    return total


def memory_split(pid="self"):
    """{"rss", "private", "shared", "pss"}: process `pid`'s resident bytes (default: this process), those only it
    holds, those it shares with other processes, and its proportional share (shared pages divided by the processes
    that map them), from /proc/PID/smaps_rollup; {} where there is none (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {p[0].rstrip(":"): int(p[1]) * 1024 for p in (line.split() for line in f) if len(p) == 3}
    except OSError:
        return {}
    return {"rss": fields["Rss"], "private": fields["Private_Clean"] + fields["Private_Dirty"],
            "shared": fields["Shared_Clean"] + fields["Shared_Dirty"], "pss": fields["Pss"]}
