"""The memory plan stage by stage: each stage's device and host peak, the largest of each, and the plan as JSON.

The host figures of every stage include the process itself (`runtime_bytes`): the interpreter and the libraries
a run imports, measured in the planning process after importing them and computing once on the CPU (a tiny soft VQ
layer's forward, backward and RMSprop step beside attention and norms: the code pages a run touches), plus
RUNTIME_ALLOWANCE for the allocator's pools (measured: CPU quantize runs of the embedded model and the tiny Flux
pipeline hold 35-100 MiB more than that and their tensors). On the CPU the device is the
host: each stage's host peak includes its device bytes. On CUDA the CUDA libraries' host memory is not counted.
"""
import dataclasses
import json
from dataclasses import dataclass

from vq4dit.utils.fileio import ResultKind, write_text_atomic

GIB, MIB = 2**30, 2**20
# what `quantize.py --dry-run --json FILE` writes (PlanPeaks.to_json), by the keys a rerun may recognise it by
PLAN_JSON = ResultKind("a plan quantize.py --dry-run --json wrote",
                       ("title", "stages", "device_peak_bytes", "host_peak_bytes"))
ALLOCATION = "bit allocation (--bits: k-means fits, probes)"
RUNTIME_ALLOWANCE = 64 * MIB


@dataclass
class StagePeak:
    """The most a stage holds: bytes on the model's device and in host memory (process and host tensors)."""

    name: str
    device_bytes: int
    host_bytes: int
    rank0_bytes: int = 0  # of host_bytes, what only rank 0 holds under torchrun (the text encoders)
    mapped_bytes: int = 0  # of host_bytes, checkpoint files' pages every process maps (held once per machine)


@dataclass
class PlanPeaks:
    """Every stage's peak in run order; `device` the run's device ("cpu": the host holds the device's bytes). The
    figures are one process's (the largest); `processes_here` torchrun processes share this machine."""

    device: str
    stages: list
    processes_here: int = 1

    @property
    def device_peak(self):
        return max(self.stages, key=lambda s: s.device_bytes)

    @property
    def host_peak(self):
        return max(self.stages, key=lambda s: s.host_bytes)

    def machine_host(self, stage):
        """This machine's host bytes with each of its processes at `stage`: the mapped files once, every process's
        own bytes, what rank 0 alone holds once."""
        n = self.processes_here
        return stage.mapped_bytes + n * (stage.host_bytes - stage.mapped_bytes) - (n - 1) * stage.rank0_bytes

    @property
    def machine_host_peak(self):
        return max(self.stages, key=self.machine_host)

    def to_json(self, title):
        machine = self.machine_host_peak
        return {"title": title, "device": self.device, "stages": [dataclasses.asdict(s) for s in self.stages],
                "device_peak_bytes": self.device_peak.device_bytes, "device_peak_stage": self.device_peak.name,
                "host_peak_bytes": self.host_peak.host_bytes, "host_peak_stage": self.host_peak.name,
                "processes_here": self.processes_here,
                "machine_host_peak_bytes": self.machine_host(machine), "machine_host_peak_stage": machine.name}

    def write_json(self, path, title):
        write_text_atomic(path, json.dumps(self.to_json(title), indent=1) + "\n")

    def format(self):
        def gib(n):
            return f"{n / GIB:8.2f}"

        on = "the CPU: host figures include it" if self.device == "cpu" else self.device
        lines = [f"  peaks by stage (GiB; device: {on}):", f"    {'stage':<52} {'device':>8} {'host':>8}"]
        lines += [f"    {s.name:<52} {gib(s.device_bytes)} {gib(s.host_bytes)}" for s in self.stages]
        lines.append(f"  largest: device {self.device_peak.device_bytes / GIB:.2f} GiB at {self.device_peak.name}; "
                     f"host {self.host_peak.host_bytes / GIB:.2f} GiB at {self.host_peak.name}")
        return "\n".join(lines)


def rss_bytes():
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def warm_up():
    """Compute once on the CPU as a run does: a tiny soft VQ layer and a Linear, attention, norms, a backward and an
    RMSprop step (the kernels' code pages become resident)."""
    import torch
    import torch.nn.functional as F

    from vq4dit.vq.layer import CodebookSpec, VQLinear

    linear = torch.nn.Linear(64, 64)
    layer = VQLinear.from_linear(linear, CodebookSpec(16, 4, 2, kmeans_iters=2), soft=True)
    x = torch.randn(4, 8, 64, requires_grad=True)  # (B, T, D)
    q = x.view(4, 8, 4, 16).transpose(1, 2)  # (B, heads, T, D / heads)
    y = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(4, 8, 64)
    y = F.gelu(F.layer_norm(layer(y), (64,)), approximate="tanh") + F.silu(linear(x))
    optimizer = torch.optim.RMSprop([p for p in layer.parameters() if p.is_floating_point()] + [x], lr=1e-3)
    y.softmax(-1).pow(2).mean().backward()
    optimizer.step()


def runtime_bytes(pipeline_classes=()):
    """The host memory of a run's process before it loads a model: the quantize job's modules and the diffusers and
    transformers classes `pipeline_classes` [(library, class name)] imported here and one computation (warm_up),
    measured, plus RUNTIME_ALLOWANCE."""
    import importlib

    import vq4dit.jobs.quantize  # noqa: F401  (what every run imports)

    for library, name in pipeline_classes:
        try:
            getattr(importlib.import_module(library), name, None)  # lazy modules import on first access
        except ImportError:
            pass
    warm_up()
    return rss_bytes() + RUNTIME_ALLOWANCE


@dataclass
class StageInputs:
    """What the stages are made of (bytes): resident models, the run's transients, host tensors; see
    jobs/memory_plan.py for how each is measured."""

    teacher: int  # the FP teacher (= the loaded model)
    hard: int  # the student with every layer hard
    quantized_hard: int  # the quantized layers alone, hard
    text_encoders: int  # the pipeline's text encoders, in fp32 on the CPU while the prompts are encoded
    record: int  # the teacher's forward at its sampling batch under the recorder
    cache: int  # host: the recorded calibration set
    walk: list  # host: the walk's tables while block i is calibrated
    soft: list  # device: block i's layers soft (over hard)
    train: list  # device: block i in training
    evaluate: list  # device: block i's largest evaluation chunk
    moments: list  # device: block i's input moments (output-aware start)
    end_pass: int  # device: the end-to-end pass, 0 without one
    end_points: int  # host: the pass's points and targets
    artifact: int  # host: the artifact's tensors while they are written
    names: list  # block names
    walks_blocks: bool = True  # False (joint, online): every layer soft and trained at once, on every block's error
    fp_blocks: list = None  # device: block i of the teacher in fp32
    stored: int = 0  # host: the model as its checkpoint stores it (a streamed run's teacher)
    stream: bool = False  # the run streams the model through the device block by block (jobs/streaming.py)
    stored_mapped: bool = False  # the streamed teacher's host tensors are views of its files' mapped pages
    encode_on_rank0: bool = False  # under torchrun rank 0 alone loads the text encoders
    processes_here: int = 1  # torchrun processes on this machine
    bits: int = 0  # device: --bits' allocation beside the teacher (plan_probes.allocation_bytes), 0 without --bits
    bits_host: int = 0  # host: its probe calls


def _peaks(x, device, out):
    """PlanPeaks of the stages `out` of StageInputs `x`."""
    return PlanPeaks("cpu" if device == "cpu" else device, out, x.processes_here)


def stages(inputs, device, runtime):
    """PlanPeaks of StageInputs `inputs` for a run on `device` whose process holds `runtime` bytes of its own."""
    if inputs.stream:
        return streamed_stages(inputs, device, runtime)
    x, cpu = inputs, device == "cpu"

    def stage(name, on_device, host):
        return StagePeak(name, on_device, runtime + host + (on_device if cpu else 0))

    resident = x.teacher + x.hard
    out = [stage("load", x.teacher, 0 if cpu else x.teacher)]
    if x.bits:
        out.append(stage(ALLOCATION, x.teacher + x.bits, x.bits_host))
    out.append(stage("build quantized layers (teacher copy + old layers)", 2 * x.teacher + x.quantized_hard, 0))
    if x.text_encoders:
        out.append(dataclasses.replace(stage("encode prompts (text encoders, CPU)", resident, x.text_encoders),
                                       rank0_bytes=x.text_encoders * x.encode_on_rank0))
    out.append(stage("record (teacher batch)", resident + x.record, x.cache))
    if not x.walks_blocks:
        out.append(stage("calibrate (every layer soft, every block at once)", resident + sum(x.soft) + sum(x.train),
                         max(x.walk)))
    for i, name in enumerate(x.names if x.walks_blocks else []):
        out.append(stage(f"walk {i} {name}", resident + x.soft[i] + x.moments[i] + x.train[i], x.walk[i]))
    worst = max(range(len(x.names)), key=lambda i: x.evaluate[i] + x.soft[i])
    soft = x.soft[worst] if x.walks_blocks else sum(x.soft)
    out.append(stage(f"evaluation passes (largest: {x.names[worst]})", resident + soft + x.evaluate[worst],
                     x.walk[worst]))
    if x.end_pass:
        out.append(stage("end-to-end pass", resident + x.end_pass, x.end_points))
    out.append(stage("save", x.hard, x.artifact))
    return _peaks(x, device, out)


def streamed_stages(inputs, device, runtime):
    """PlanPeaks of a streamed run (jobs/streaming.py): the teacher on the host as stored, its parts outside the
    blocks on the device in fp32, one block at a time in fp32 beside the student (every layer hard but the block's
    under calibration)."""
    x, cpu = inputs, device == "cpu"

    def stage(name, on_device, host):
        return StagePeak(name, on_device, runtime + x.stored + host + (on_device if cpu else 0),
                         mapped_bytes=x.stored * x.stored_mapped)

    block, outside = max(x.fp_blocks), x.teacher - sum(x.fp_blocks)
    # on a GPU the next block's copies are staged while a block runs (models.offload.CudaStager): one block more, in
    # its stored dtype (the stored model's share of the fp32 one), from the first block moved in until the end
    staged = 0 if cpu else block * x.stored // max(x.teacher, 1)
    resident = outside + x.hard + staged  # the teacher's parts outside the blocks, the student, the staged block
    out = [stage("load (host, stored dtype)", 0, 0)]
    if x.bits:
        out.append(stage(ALLOCATION, outside + staged + block + x.bits, x.bits_host))
    out.append(stage("build quantized layers (block by block)", x.hard + staged + block, 0))
    if x.text_encoders:
        out.append(dataclasses.replace(stage("encode prompts (text encoders, CPU)", resident, x.text_encoders),
                                       rank0_bytes=x.text_encoders * x.encode_on_rank0))
    out.append(stage("record (teacher batch, one block on the device)", resident + block + x.record, x.cache))
    if not x.walks_blocks:
        out.append(stage("calibrate (every layer soft, every block at once)",
                         resident + block + sum(x.soft) + sum(x.train), max(x.walk)))
    for i, name in enumerate(x.names if x.walks_blocks else []):
        out.append(stage(f"walk {i} {name}", resident + x.fp_blocks[i] + x.soft[i] + x.moments[i] + x.train[i],
                         x.walk[i]))
    worst = max(range(len(x.names)), key=lambda i: x.fp_blocks[i] + x.evaluate[i] + x.soft[i])
    soft = x.soft[worst] if x.walks_blocks else sum(x.soft)
    out.append(stage(f"evaluation passes (largest: {x.names[worst]})",
                     resident + x.fp_blocks[worst] + soft + x.evaluate[worst], x.walk[worst]))
    if x.end_pass:
        out.append(stage("end-to-end pass", resident + x.end_pass, x.end_points))
    out.append(StagePeak("save", x.hard, runtime + x.artifact + (x.hard if cpu else 0)))
    return _peaks(x, device, out)
