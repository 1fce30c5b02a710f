"""Checkpoint layouts: where each parameter of vlmd's models lies in a checkpoint's tensors.

A layout is data: a table of rules, each matching checkpoint keys (a regular expression) and
naming the model parameters they hold. Most tensors are one parameter under another name; a
packed tensor holds several, each a set of its rows (`RowMap`):

    OpenGVLab                                  vlmd (transformers' names)
    vision_model.encoder.layers.N.attn.qkv     vision_tower.encoder.layer.N.attention.{q,k,v}_proj
                                                 (thirds of the rows)
    mlp1.{0,1,3}                               multi_modal_projector.{layer_norm,linear_1,linear_2}
    language_model.model.* / .lm_head          model.* / lm_head (Qwen2, Llama, Qwen3)
    Phi-3: self_attn.qkv_proj,                 self_attn.{q,k,v}_proj, mlp.{gate,up}_proj (rows
           mlp.gate_up_proj (either layout)      one after another)
    InternLM2: attention.wqkv                  self_attn.{q,k,v}_proj: per KV head, its query
                                                 heads, then k, then v (head_dim rows each)
               tok_embeddings, attention.wo,   embed_tokens, self_attn.o_proj,
               feed_forward.w1/w3/w2,          mlp.gate_proj/up_proj/down_proj,
               attention_norm, ffn_norm,       input_layernorm, post_attention_layernorm,
               output                          lm_head

    transformers (hub)                         transformers (legacy, save_pretrained in v5)
    model.vision_tower.* / model.multi_modal_projector.* / model.language_model.* / lm_head
                                               vision_tower.* / multi_modal_projector.* /
                                               language_model.model.* / language_model.lm_head

Rows, not whole tensors, are the unit, so a tensor-parallel rank reads only the rows of its
heads even from a packed tensor (`RowMap.ranges`). The loader (`vlmd.models.loader`) applies a
layout; nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmd.models.config import OPENGVLAB, InternVLArch

VISION, LANGUAGE = "vision", "language"


class RowMap:
    """Which rows (dim 0) of a packed checkpoint tensor hold rows [start, start + length) of one
    parameter. The identity for a tensor that is the parameter whole."""

    def ranges(self, start: int, length: int) -> list[tuple[int, int]]:
        return [(start, length)]


@dataclass(frozen=True)
class Offset(RowMap):
    """The parameter is the rows from `offset` on (the q, k or v third of a fused qkv)."""

    offset: int

    def ranges(self, start: int, length: int) -> list[tuple[int, int]]:
        return [(self.offset + start, length)]


@dataclass(frozen=True)
class GroupedHeads(RowMap):
    """One of q, k, v in InternLM2's `wqkv`: for each KV head j, the rows of its `group` query
    heads, then its k head, then its v head, `head_dim` rows each. `slot` is the head's place
    in its block: 0..group-1 for queries (`queries=True`), group for k, group + 1 for v."""

    head_dim: int
    group: int  # query heads per KV head
    queries: bool
    slot: int = 0  # k: group, v: group + 1 (ignored for queries)

    def ranges(self, start: int, length: int) -> list[tuple[int, int]]:
        d, block = self.head_dim, self.group + 2
        out: list[tuple[int, int]] = []
        row = start
        while row < start + length:
            head, within = divmod(row, d)
            if self.queries:
                kv_head, slot = divmod(head, self.group)
                run = min(start + length - row, (self.group - slot) * d - within)  # to the block's k
            else:
                kv_head, slot = head, self.slot
                run = min(start + length - row, d - within)
            first = (kv_head * block + slot) * d + within
            if out and out[-1][0] + out[-1][1] == first:
                out[-1] = (out[-1][0], out[-1][1] + run)
            else:
                out.append((first, run))
            row += run
        return out


WHOLE = RowMap()


@dataclass(frozen=True)
class Source:
    """Where one model parameter is: the checkpoint key, and which of its rows."""

    key: str
    rows: RowMap = WHOLE

    @property
    def packed(self) -> bool:
        return self.rows is not WHOLE


@dataclass(frozen=True)
class Rule:
    """Checkpoint keys matching `pattern` (whole key) hold the parameters `targets` names: each a
    re.sub template over the match and the rows of the key it takes (None: the whole tensor)."""

    pattern: str
    component: str
    targets: tuple[tuple[str, RowMap | None], ...]


def _rename(pattern: str, component: str, target: str) -> Rule:
    return Rule(pattern, component, ((target, None),))


def _split(pattern: str, component: str, targets: list[tuple[str, RowMap]]) -> Rule:
    return Rule(pattern, component, tuple(targets))


_HF_RULES = (
    _rename(r"model\.vision_tower\.(.+)", VISION, r"vision_tower.\1"),
    _rename(r"model\.multi_modal_projector\.(.+)", VISION, r"multi_modal_projector.\1"),
    _rename(r"model\.language_model\.(.+)", LANGUAGE, r"model.\1"),
    _rename(r"lm_head\.(.+)", LANGUAGE, r"lm_head.\1"),
    _rename(r"vision_tower\.(.+)", VISION, r"vision_tower.\1"),
    _rename(r"multi_modal_projector\.(.+)", VISION, r"multi_modal_projector.\1"),
    _rename(r"language_model\.model\.(.+)", LANGUAGE, r"model.\1"),
    _rename(r"language_model\.lm_head\.(.+)", LANGUAGE, r"lm_head.\1"),
)

_VIT = r"vision_model\.encoder\.layers\.(\d+)\."
_VIT_OUT = r"vision_tower.encoder.layer.\1."


def _opengvlab_vision_rules(arch: InternVLArch) -> tuple[Rule, ...]:
    hidden = arch.vision_hidden_size
    thirds = [(_VIT_OUT + rf"attention.{name}_proj.\2", Offset(i * hidden)) for i, name in enumerate("qkv")]
    return (
        _rename(r"vision_model\.embeddings\.class_embedding", VISION, "vision_tower.embeddings.cls_token"),
        _rename(
            r"vision_model\.embeddings\.position_embedding",
            VISION,
            "vision_tower.embeddings.position_embeddings",
        ),
        _rename(
            r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
            VISION,
            r"vision_tower.embeddings.patch_embeddings.projection.\1",
        ),
        _split(_VIT + r"attn\.qkv\.(weight|bias)", VISION, thirds),
        _rename(_VIT + r"attn\.proj\.(weight|bias)", VISION, _VIT_OUT + r"attention.projection_layer.\2"),
        _rename(_VIT + r"attn\.(q_norm|k_norm)\.weight", VISION, _VIT_OUT + r"attention.\2.weight"),
        _rename(_VIT + r"ls(1|2)", VISION, _VIT_OUT + r"lambda_\2"),
        _rename(_VIT + r"norm1\.(weight|bias)", VISION, _VIT_OUT + r"layernorm_before.\2"),
        _rename(_VIT + r"norm2\.(weight|bias)", VISION, _VIT_OUT + r"layernorm_after.\2"),
        _rename(_VIT + r"mlp\.(fc1|fc2)\.(weight|bias)", VISION, _VIT_OUT + r"mlp.\2.\3"),
        _rename(r"mlp1\.0\.(weight|bias)", VISION, r"multi_modal_projector.layer_norm.\1"),
        _rename(r"mlp1\.1\.(weight|bias)", VISION, r"multi_modal_projector.linear_1.\1"),
        _rename(r"mlp1\.3\.(weight|bias)", VISION, r"multi_modal_projector.linear_2.\1"),
    )


_LM = r"language_model\.model\.layers\.(\d+)\."
_LM_OUT = r"model.layers.\1."


def _internlm2_rules(arch: InternVLArch) -> tuple[Rule, ...]:
    d, group = arch.head_dim, arch.num_attention_heads // arch.num_key_value_heads
    wqkv = [
        (_LM_OUT + r"self_attn.q_proj.weight", GroupedHeads(d, group, queries=True)),
        (_LM_OUT + r"self_attn.k_proj.weight", GroupedHeads(d, group, queries=False, slot=group)),
        (_LM_OUT + r"self_attn.v_proj.weight", GroupedHeads(d, group, queries=False, slot=group + 1)),
    ]
    return (
        _rename(r"language_model\.model\.tok_embeddings\.weight", LANGUAGE, "model.embed_tokens.weight"),
        _split(_LM + r"attention\.wqkv\.weight", LANGUAGE, wqkv),
        _rename(_LM + r"attention\.wo\.weight", LANGUAGE, _LM_OUT + "self_attn.o_proj.weight"),
        _rename(_LM + r"feed_forward\.w1\.weight", LANGUAGE, _LM_OUT + "mlp.gate_proj.weight"),
        _rename(_LM + r"feed_forward\.w3\.weight", LANGUAGE, _LM_OUT + "mlp.up_proj.weight"),
        _rename(_LM + r"feed_forward\.w2\.weight", LANGUAGE, _LM_OUT + "mlp.down_proj.weight"),
        _rename(_LM + r"attention_norm\.weight", LANGUAGE, _LM_OUT + "input_layernorm.weight"),
        _rename(_LM + r"ffn_norm\.weight", LANGUAGE, _LM_OUT + "post_attention_layernorm.weight"),
        _rename(r"language_model\.model\.norm\.weight", LANGUAGE, "model.norm.weight"),
        _rename(r"language_model\.output\.weight", LANGUAGE, "lm_head.weight"),
    )


def _phi3_rules(arch: InternVLArch, prefix: str) -> tuple[Rule, ...]:
    """Phi-3's packed projections, in either layout (`prefix`: where its layers are): `qkv_proj`
    holds the q rows, then k's, then v's; `gate_up_proj` the gate rows, then up's."""
    layer = re.escape(prefix) + r"layers\.(\d+)\."
    q_size, kv_size = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    qkv = [
        (_LM_OUT + "self_attn.q_proj.weight", Offset(0)),
        (_LM_OUT + "self_attn.k_proj.weight", Offset(q_size)),
        (_LM_OUT + "self_attn.v_proj.weight", Offset(q_size + kv_size)),
    ]
    gate_up = [
        (_LM_OUT + "mlp.gate_proj.weight", Offset(0)),
        (_LM_OUT + "mlp.up_proj.weight", Offset(arch.intermediate_size)),
    ]
    return (
        _split(layer + r"self_attn\.qkv_proj\.weight", LANGUAGE, qkv),
        _split(layer + r"mlp\.gate_up_proj\.weight", LANGUAGE, gate_up),
    )


_OPENGVLAB_TEXT_RULES = (
    _rename(r"language_model\.model\.(.+)", LANGUAGE, r"model.\1"),
    _rename(r"language_model\.lm_head\.(.+)", LANGUAGE, r"lm_head.\1"),
)


def layout_rules(arch: InternVLArch) -> tuple[Rule, ...]:
    """The rules of the architecture's checkpoint layout (first match wins)."""
    if arch.layout != OPENGVLAB:
        if arch.text_family == "phi3":
            return (
                _phi3_rules(arch, "model.language_model.")
                + _phi3_rules(arch, "language_model.model.")
                + _HF_RULES
            )
        return _HF_RULES
    if arch.text_family == "internlm2":
        text = _internlm2_rules(arch)
    elif arch.text_family == "phi3":
        text = _phi3_rules(arch, "language_model.model.") + _OPENGVLAB_TEXT_RULES
    else:
        text = _OPENGVLAB_TEXT_RULES
    return _opengvlab_vision_rules(arch) + text


class LayoutError(ValueError):
    """The checkpoint's keys do not fit the layout its config.json implies."""


def component_sources(arch: InternVLArch, keys, component: str, source: str) -> dict[str, Source]:
    """Every parameter of `component` (VISION or LANGUAGE) that the checkpoint `keys` hold ->
    where it lies. Tensors of ViT layers after the selected feature layer are left out (they
    never run); a key no rule matches is a LayoutError naming it."""
    rules = [(re.compile(rule.pattern), rule) for rule in layout_rules(arch)]
    out: dict[str, Source] = {}
    unknown = []
    for key in keys:
        match = rule = None
        for pattern, candidate in rules:
            if (match := pattern.fullmatch(key)) is not None:
                rule = candidate
                break
        if rule is None:
            unknown.append(key)
            continue
        if rule.component != component:
            continue
        for template, rows in rule.targets:
            name = match.expand(template)
            if _beyond_feature_layer(name, arch):
                continue
            if name in out:
                raise LayoutError(f"{source}: {key} and {out[name].key} are the same parameter")
            out[name] = Source(key, rows or WHOLE)
    if unknown:
        raise LayoutError(
            f"{source}: unrecognised checkpoint keys (not in the {arch.layout} layout): {preview(unknown)}"
        )
    return out


_VISION_LAYER = re.compile(r"vision_tower\.encoder\.layer\.(\d+)\.")


def _beyond_feature_layer(name: str, arch: InternVLArch) -> bool:
    """A ViT parameter that does not run: a layer after the selected one, or the final norm when
    the features are taken before it."""
    layer = _VISION_LAYER.match(name)
    if layer is not None:
        return int(layer[1]) >= arch.vision_num_hidden_layers
    return name.startswith("vision_tower.layernorm.") and not arch.vision_final_norm


def preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})" if keys else "none"
