"""LoRA adapters chosen per request, with requests using different adapters (or none) in one
batched forward.

Loading reads the file formats diffusers' ``load_lora_weights`` reads (diffusers/PEFT keys,
and kohya/A1111 keys through diffusers' own converters), for the UNet and the text
encoders, and checks every layer against the model: the module exists, is a linear layer, and
the shapes fit. Each adapter layer is ``(down, up, scale)``: PEFT's ``lora_A``, ``lora_B`` and
``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), per module as PEFT resolves rank and alpha
patterns.

Serving never merges weights and never splits a batch: every targeted linear layer is wrapped
(:class:`LoraLinear`) and, during a forward with a :class:`LoraPlan`, adds to each row the
low-rank products of that row's adapters, ``s_r * B_r (A_r x_r)``: one gathered product per
layer for all rows whatever their adapters (each row takes its adapter's weights from a stack
of the batch's adapters, and ``bmm`` runs every row's own small product, so a row's bits do
not depend on its neighbours), added in the order of the request's own adapter list. Rows
without adapters cost nothing beyond the base layer.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Components an adapter file may carry layers for, by key prefix.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# A row's adapters: (name, scale) in the request's order.
LoraStack = tuple[tuple[str, float], ...]


class LoraLoadError(ValueError):
    """An adapter file cannot be used with its model; the message says what does not fit."""


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: ``W x + scale * up (down x)``."""

    down: torch.Tensor  # rank x in (PEFT's lora_A)
    up: torch.Tensor  # out x rank (lora_B)
    scale: float  # lora_alpha / rank (rsLoRA: / sqrt(rank))

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraAdapter:
    """A registered adapter: its layers per component, by module path."""

    name: str
    source: str
    layers: dict[str, dict[str, LoraLayer]]

    @property
    def rank(self) -> int:
        return max(layer.rank for layers in self.layers.values() for layer in layers.values())

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if self.layers.get(c))

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraAdapter:
        layers = {
            c: {
                p: LoraLayer(w.down.to(device, dtype), w.up.to(device, dtype), w.scale) for p, w in ls.items()
            }
            for c, ls in self.layers.items()
        }
        return LoraAdapter(self.name, self.source, layers)


def _weights_file(path: Path) -> Path:
    """The adapter's ``.safetensors`` file: ``path`` itself, or the one file in directory ``path``."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise LoraLoadError(f"{str(path)!r} does not exist")
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise LoraLoadError(f"{str(path)!r} must hold exactly one .safetensors file (found: {found})")
    return files[0]


def read_lora(name: str, path: Path, pipeline_class: Any, models: dict[str, nn.Module | None]) -> LoraAdapter:
    """Read the adapter at ``path`` (a ``.safetensors`` file or a directory holding one) for
    the components in ``models`` (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``),
    converting its keys as ``pipeline_class.lora_state_dict`` does, and check it against them."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    file = _weights_file(Path(path))
    try:
        state, alphas, metadata = pipeline_class.lora_state_dict(
            str(file.parent), weight_name=file.name, return_lora_metadata=True, local_files_only=True
        )
    except Exception as e:
        raise LoraLoadError(f"{str(file)!r} is not a LoRA file diffusers reads: {e}") from e
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    unknown = sorted({k.split(".")[0] for k in state} - set(COMPONENTS))
    if unknown:
        raise LoraLoadError(
            f"{str(file)!r} has layers for {', '.join(unknown)}, which is not a part of this model"
        )
    layers: dict[str, dict[str, LoraLayer]] = {}
    for component in COMPONENTS:
        part = {k.removeprefix(f"{component}."): v for k, v in state.items() if k.startswith(f"{component}.")}
        if not part:
            continue
        model = models.get(component)
        if model is None:
            raise LoraLoadError(f"{str(file)!r} has {component} layers; this model has no {component}")
        if component == "unet":
            # Any key not in PEFT's names is converted (diffusers' training scripts save
            # attention layers in diffusers' names and feed-forward ones in PEFT's; diffusers'
            # loader decides from the first key alone).
            if not all(".lora_A." in k or ".lora_B." in k for k in part):
                part = convert_unet_state_dict_to_peft(part)  # type: ignore[no-untyped-call]
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))  # type: ignore[no-untyped-call]
            if not hasattr(model, "text_model"):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        config = _config(component, part, alphas, metadata)
        layers[component] = _layers(file, component, part, config, model)
    if not layers:
        raise LoraLoadError(f"{str(file)!r} holds no LoRA layers")
    return LoraAdapter(name, str(file), layers)


def _config(
    component: str,
    part: dict[str, torch.Tensor],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    """Rank and alpha settings for ``component``, as diffusers builds its ``LoraConfig``:
    from the file's adapter metadata when it has some, else from kohya alphas and shapes."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    if metadata:
        own = {
            k.removeprefix(f"{component}."): v for k, v in metadata.items() if k.startswith(f"{component}.")
        }
        if own:
            return own
    ranks = {k: v.shape[1] for k, v in part.items() if "lora_B" in k}
    own_alphas = None
    if alphas:
        own_alphas = {
            k.removeprefix(f"{component}."): v for k, v in alphas.items() if k.startswith(f"{component}.")
        }
    kwargs = get_peft_kwargs(ranks, own_alphas, part, is_unet=component == "unet")  # type: ignore[no-untyped-call]
    return dict(kwargs)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: a pattern matches a module path that ends with it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _layers(
    file: Path, component: str, part: dict[str, torch.Tensor], config: dict[str, Any], model: nn.Module
) -> dict[str, LoraLayer]:
    modules = dict(model.named_modules())
    extra = sorted(k for k in part if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if extra:
        raise LoraLoadError(
            f"{str(file)!r}: {component} keys stepserve does not serve (DoRA, LoRA biases, other "
            f"adapter types?): {', '.join(extra[:4])}"
        )
    out: dict[str, LoraLayer] = {}
    for key in sorted(k for k in part if k.endswith(".lora_A.weight")):
        path = key.removesuffix(".lora_A.weight")
        down, up = part[key], part.get(f"{path}.lora_B.weight")
        where = f"{str(file)!r}: {component}.{path}"
        if up is None:
            raise LoraLoadError(f"{where} has lora_A but no lora_B")
        module = modules.get(path)
        if isinstance(module, LoraLinear):
            module = module.base
        if module is None:
            raise LoraLoadError(f"{where}: the model has no such module")
        if not isinstance(module, nn.Linear):
            raise LoraLoadError(
                f"{where} adapts a {type(module).__name__}; stepserve serves LoRA on linear layers only"
            )
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise LoraLoadError(
                f"{where}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} do not chain"
            )
        if down.shape[1] != module.in_features or up.shape[0] != module.out_features:
            raise LoraLoadError(
                f"{where}: rank {down.shape[0]} adapter of a {down.shape[1]} -> {up.shape[0]} layer, "
                f"but the model's layer is {module.in_features} -> {module.out_features}"
            )
        rank = int(down.shape[0])
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        out[path] = LoraLayer(down.float().contiguous(), up.float().contiguous(), scale)
    return out


@dataclass(frozen=True)
class _Stacked:
    """One layer's weights for a set of adapters of one rank, stacked so that a forward
    gathers each row's own: ``member[k]`` is adapter k's index here (-1: not in this stack)."""

    down: torch.Tensor  # adapters x rank x in
    up: torch.Tensor  # adapters x out x rank
    scale: torch.Tensor  # adapters
    member: tuple[int, ...]


def _stack_layer(layers: Sequence[LoraLayer | None]) -> list[_Stacked]:
    """``layers`` (one per adapter of a set, None where an adapter lacks the layer) stacked
    by rank: one stack for the usual case of one rank."""
    out = []
    for rank in sorted({w.rank for w in layers if w is not None}):
        chosen = [w for w in layers if w is not None and w.rank == rank]
        member, n = [], 0
        for w in layers:
            member.append(n if w is not None and w.rank == rank else -1)
            n += member[-1] >= 0
        like = chosen[0].down
        out.append(
            _Stacked(
                torch.stack([w.down for w in chosen]),
                torch.stack([w.up for w in chosen]),
                torch.tensor([w.scale for w in chosen], device=like.device, dtype=like.dtype),
                tuple(member),
            )
        )
    return out


@dataclass(frozen=True)
class _Rows:
    """The rows of one forward that take part in one stack's product."""

    index: torch.Tensor  # row in the batch
    slot: torch.Tensor  # the row's adapter in the stack
    scale: torch.Tensor  # the row's scale


class LoraPlan:
    """Which adapters each row of one forward uses: built per forward from the rows' stacks,
    read by every :class:`LoraLinear` of one component during it.

    Per position in the stacks (every row's first adapter, then every second...), each
    targeted layer runs one gathered product for all its rows, whatever their adapters: each
    row takes its own adapter's weights from the layer's stack (``index_select``) and ``bmm``
    computes ``s_r * B_r (A_r x_r)`` for every row at once, each batch element its own small
    product, so a row's bits do not depend on its neighbours. Adapters of different ranks for
    one layer make one stack per rank."""

    def __init__(
        self,
        component: str,
        stacks: Sequence[LoraStack],
        adapters: dict[str, LoraAdapter],
        context: LoraContext,
    ) -> None:
        self.component = component
        self.context = context
        first = next(iter(adapters.values()))
        like = next(iter(next(iter(first.layers.values())).values())).down
        self.device, self.dtype = like.device, like.dtype
        # Per position: the adapters there (sorted names), each row's index among them.
        self.positions: list[tuple[tuple[LoraAdapter, ...], list[int], list[int], list[float]]] = []
        for pos in range(max((len(s) for s in stacks), default=0)):
            rows = [r for r, s in enumerate(stacks) if pos < len(s)]
            names = tuple(sorted({stacks[r][pos][0] for r in rows}))
            slots = [names.index(stacks[r][pos][0]) for r in rows]
            scales = [stacks[r][pos][1] for r in rows]
            self.positions.append((tuple(adapters[n] for n in names), rows, slots, scales))
        self._rows: dict[tuple[int, tuple[int, ...]], _Rows | None] = {}

    def _rows_of(self, pos: int, member: tuple[int, ...]) -> _Rows | None:
        """The rows at ``pos`` whose adapter is in the stack with ``member``; cached, since
        most layers share one."""
        key = (pos, member)
        if key not in self._rows:
            _, rows, slots, scales = self.positions[pos]
            keep = [i for i, k in enumerate(slots) if member[k] >= 0]
            self._rows[key] = (
                _Rows(
                    torch.tensor([rows[i] for i in keep], device=self.device, dtype=torch.long),
                    torch.tensor([member[slots[i]] for i in keep], device=self.device, dtype=torch.long),
                    torch.tensor([scales[i] for i in keep], device=self.device, dtype=self.dtype),
                )
                if keep
                else None
            )
        return self._rows[key]

    def apply(self, path: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base layer's output for input ``x``) with each row's adapters added."""
        for pos, (adapters, _, _, _) in enumerate(self.positions):
            for st in self.context.stacked(self.component, adapters, path):
                rows = self._rows_of(pos, st.member)
                if rows is None:
                    continue
                xs = x.index_select(0, rows.index)
                flat = xs.dim() == 2
                if flat:
                    xs = xs.unsqueeze(1)
                down = st.down.index_select(0, rows.slot).transpose(1, 2)
                up = st.up.index_select(0, rows.slot).transpose(1, 2)
                s = rows.scale * st.scale.index_select(0, rows.slot)
                d = torch.bmm(torch.bmm(xs, down), up) * s.view(-1, 1, 1)
                y = y.index_add(0, rows.index, d.squeeze(1) if flat else d)
        return y


class LoraContext:
    """The plan of the forward running now (None: no adapters in it), shared by the wrapped
    layers of one model, and the stacked weights of the adapter sets recent forwards used
    (the set changes only when a request with a new adapter joins: up to ``keep_sets`` sets
    are kept, each a copy of its adapters' weights)."""

    def __init__(self, keep_sets: int = 4) -> None:
        self.plans: dict[str, LoraPlan] = {}
        self.keep_sets = keep_sets
        self._stacked: OrderedDict[
            tuple[str, tuple[int, ...]], tuple[tuple[LoraAdapter, ...], dict[str, list[_Stacked]]]
        ] = OrderedDict()

    def plan(self, component: str, stacks: Sequence[LoraStack], adapters: dict[str, LoraAdapter]) -> LoraPlan:
        return LoraPlan(component, stacks, adapters, self)

    def stacked(self, component: str, adapters: tuple[LoraAdapter, ...], path: str) -> list[_Stacked]:
        """Layer ``path``'s weights for ``adapters``, stacked (built on first use)."""
        # By identity: an adapter loaded to the device again is a new object, so a stale
        # stack is never used (and leaves with the least recently used sets).
        # The entry holds the adapters, so their ids stay theirs while it lives.
        key = (component, tuple(id(a) for a in adapters))
        entry = self._stacked.get(key)
        if entry is None:
            entry = self._stacked[key] = (adapters, {})
            while len(self._stacked) > self.keep_sets:
                self._stacked.popitem(last=False)
        self._stacked.move_to_end(key)
        per_path = entry[1]
        got = per_path.get(path)
        if got is None:
            got = per_path[path] = _stack_layer([a.layers.get(component, {}).get(path) for a in adapters])
        return got

    def forget(self, adapter: LoraAdapter) -> None:
        """Drop the stacked sets holding ``adapter`` (it left the device)."""
        for key in [k for k, (held, _) in self._stacked.items() if any(a is adapter for a in held)]:
            del self._stacked[key]


class LoraLinear(nn.Module):
    """A linear layer some registered adapter targets: the base layer, plus the current
    plan's low-rank terms for the rows that use adapters."""

    def __init__(self, base: nn.Linear, component: str, path: str, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.component = component
        self.path = path
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        plan = self.context.plans.get(self.component)
        return y if plan is None else plan.apply(self.path, x, y)


def wrap_targets(model: nn.Module, component: str, paths: Iterable[str], context: LoraContext) -> int:
    """Wrap the layers at ``paths`` of ``model`` (not yet wrapped) in :class:`LoraLinear`;
    returns how many were wrapped."""
    n = 0
    modules = dict(model.named_modules())
    for path in paths:
        module = modules.get(path)
        if module is None or isinstance(module, LoraLinear):
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = modules[parent_path] if parent_path else model
        assert isinstance(module, nn.Linear)
        setattr(parent, attr, LoraLinear(module, component, path, context))
        n += 1
    return n
