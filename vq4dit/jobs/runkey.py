"""What a resumed calibration must match: the run key of a quantize job (its config and its input files by content).

The checkpoint store (calib/checkpoints.py) is opened with a RunKey and refuses a checkpoint saved under another.
"""
import json
import os
from dataclasses import asdict, dataclass

from vq4dit.models.loading import embedded_ckpt_path
from vq4dit.utils.digest import json_digest, sampled_digest
from vq4dit.utils.errors import UserError

# where the run happens, not what it computes (micro_batch: the same update, summed in another order, so that a run
# fitted to one device resumes on another, jobs/fit.py)
RUN_ONLY_FIELDS = ("device", "stream", "micro_batch", "cache_dir", "max_cache_gb")


@dataclass(frozen=True)
class Input:
    """A file the result depends on, by content: its role (for messages), its path as configured, and its
    utils.digest.sampled_digest (a path that does not exist locally, e.g. a hub id, is identified by its name)."""

    role: str
    path: str
    digest: str

    @classmethod
    def of(cls, role, path):
        local = os.path.expanduser(path)
        if not os.path.exists(local):
            return cls(role, path, "not a local path")
        try:
            return cls(role, path, sampled_digest(local))
        except OSError as e:
            raise UserError(f"{role} {path}: cannot read it ({e.strerror})") from None


@dataclass(frozen=True)
class RunKey:
    """What a calibration's result depends on: every config field but RUN_ONLY_FIELDS ({field: value}, as JSON
    gives it back) and the content of its input files (Input: the checkpoint, the prompts file). A resumed run must
    have the key of the run that was interrupted: the same path holding another checkpoint would otherwise give an
    artifact whose first blocks come from one model and the rest from another."""

    config: dict
    inputs: tuple = ()

    @classmethod
    def of(cls, config):
        """The key of QuantizeConfig `config`; each input file is digested here, once per run."""
        fields = {k: v for k, v in config.to_dict().items() if k not in RUN_ONLY_FIELDS}
        spec = config.model
        inputs = [Input.of("checkpoint", spec.ckpt if spec.ckpt is not None else str(embedded_ckpt_path()))]
        if spec.prompts:
            inputs.append(Input.of("prompts file", spec.prompts))
        return cls(json.loads(json.dumps(fields)), tuple(inputs))

    def to_json(self):
        return {"config": self.config, "inputs": [asdict(i) for i in self.inputs]}

    def digest(self):
        """sha256 of the key: an artifact records it (quant_config.json's run_key) so that a rerun of the same
        command can keep the artifact instead of making it again (quantize.py --skip-existing)."""
        return json_digest(self.to_json())

    def change(self, saved):
        """What differs from `saved` (a to_json() read back) in words, or None: an input file whose content changed
        first, then the config fields that differ (a new path is one of them)."""
        before = {i["role"]: i for i in saved["inputs"]}
        for now in self.inputs:
            old = before.get(now.role)
            if old is not None and old["digest"] != now.digest:
                return (f"{now.role} {now.path} changed since the saved calibration state (digest {old['digest']} "
                        f"!= {now.digest})")
        old_config = saved["config"]
        changed = sorted(k for k in old_config.keys() | self.config.keys() if old_config.get(k) != self.config.get(k))
        if changed:
            return "the config changed since the saved calibration state (" + ", ".join(
                f"{k} {old_config.get(k)!r} -> {self.config.get(k)!r}" for k in changed[:3]) + ")"
        return None
