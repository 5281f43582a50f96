"""Several frozen teachers behind the one :class:`Teacher` contract (recipe ``teacher.extra``).

Teacher ``k`` (0 = ``teacher.source``, then ``teacher.extra`` in order) answers the output keys
``pooled_k`` / ``proj_k``; the plain keys ``pooled`` / ``proj`` mean teacher 0, so evaluation and tools that
expect one teacher (teacher kNN, neighbour bags) see the first one. The trainer, the feature cache and the
resume fingerprints need no other change: an ensemble is one teacher whose identity is the ordered list of
its members' checkpoint hashes.

Every member sees the run's input normalisation (``data.mean`` / ``data.std``, by default the first teacher's);
:func:`preprocess_mismatches` names the members that were trained with another one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch

from distillctl.errors import UsageError
from distillctl.teachers.base import Teacher


# teacher output names: teacher k's outputs are pooled_k / proj_k; group 1 is the kind, group 2 the teacher index
# (None for the plain names). The feature cache names its stored outputs the same way (cache.layout).
OUTPUT_NAME = re.compile(r"^(pooled|proj)(?:_(\d{1,2}))?$")


def member_key(output: str, k: int) -> str:
    """The output key of teacher ``k``: ``pooled_0``, ``proj_1``, …"""
    return f"{output}_{k}"


def parse_key(key: str) -> tuple[str, int | None]:
    """``"proj_1"`` → ``("proj", 1)``; ``"pooled"`` → ``("pooled", None)``."""
    match = OUTPUT_NAME.match(key)
    if match is None:
        raise UsageError(f"unknown teacher output '{key}' (expected pooled, proj, pooled_<k> or proj_<k>)")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


@dataclass
class TeacherEnsemble(Teacher):
    members: list[Teacher] = field(default_factory=list)

    @classmethod
    def of(cls, members: list[Teacher]) -> "TeacherEnsemble":
        if len(members) < 2:
            raise UsageError("an ensemble needs two or more teachers")
        first = members[0]
        digest = hashlib.sha256("\n".join(m.sha256 for m in members).encode()).hexdigest()
        licenses = list(dict.fromkeys(m.license for m in members))
        return cls(name="ensemble:" + "+".join(m.name for m in members), arch="+".join(m.arch for m in members),
                   backbone=first.backbone, embed_dim=first.embed_dim, sha256=digest, projection=first.projection,
                   proj_dim=first.proj_dim, license="; ".join(licenses), preprocess=first.preprocess,
                   source="ensemble", reference_top1=first.reference_top1, members=list(members))

    def parts(self) -> dict[str, torch.nn.Module]:
        return {f"member{k}.{name}": module for k, member in enumerate(self.members)
                for name, module in member.parts().items()}

    def freeze(self) -> "TeacherEnsemble":
        for member in self.members:
            member.freeze()
        return self

    def to(self, device: torch.device | str) -> "TeacherEnsemble":
        for member in self.members:
            member.to(device)
        return self

    def set_bn_mode(self, mode: str) -> None:
        for member in self.members:
            member.set_bn_mode(mode)

    def forward(self, images: torch.Tensor, outputs: frozenset[str] | set[str], taps: tuple[str, ...] = (),
                grad: bool = False) -> dict[str, torch.Tensor]:
        """Each member answers its keys; taps come from teacher 0 (the ensemble is never co-trained)."""
        if grad:
            raise UsageError("an ensemble of teachers cannot be co-trained")
        wanted: dict[int, list[tuple[str, str]]] = {}  # member → [(its output, the key asked for)]
        for key in outputs:
            output, k = parse_key(key)
            k = 0 if k is None else k  # plain "pooled"/"proj": the first teacher
            if k >= len(self.members):
                raise UsageError(f"teacher output '{key}' asks for teacher {k}, but the run has "
                                 f"{len(self.members)} teachers")
            wanted.setdefault(k, []).append((output, key))
        if taps:
            wanted.setdefault(0, [])
        result: dict[str, torch.Tensor] = {}
        for k, pairs in sorted(wanted.items()):
            values = self.members[k].forward(images, {output for output, _ in pairs}, taps=taps if k == 0 else ())
            result.update({tap: values[tap] for tap in (taps if k == 0 else ())})
            for output, key in pairs:
                result[key] = values[output]
        return result

    def member_dims(self) -> list[tuple[int, int | None]]:
        """(embed_dim, proj_dim) per member, in order (the pipeline turns them into the methods' TeacherDims)."""
        return [(m.embed_dim, m.proj_dim) for m in self.members]

    def describe(self) -> dict:
        return {**super().describe(), "members": [m.describe() for m in self.members]}


def preprocess_mismatches(members: list[Teacher], mean, std, tolerance: float = 1e-3) -> list[str]:
    """Names of the members whose own preprocessing differs from the run's normalisation."""
    def differs(a, b) -> bool:
        return any(abs(float(x) - float(y)) > tolerance for x, y in zip(a, b))

    return [m.name for m in members if differs(m.preprocess.mean, mean) or differs(m.preprocess.std, std)]
