"""The fields this plugin adds to the capture requests (``request_fields``): ``interventions``, ``logit_lens``,
``probes`` and, for generations, ``stop_when``. The kernel puts them on /extract, /generate (and its batch and stream
forms) and the OpenAI completions, and hands their values to ``readouts``."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from loom_kernel import LayerSpec, NonEmpty, RequestField

MAX_INTERVENTIONS = 32
MAX_STOP_RULES = 8


class FeatureRef(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    probe: str
    index: int


class InterventionSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One edit: ``vector`` is a list, a list of lists, a wire tensor or a stored name; ``feature`` names row
    ``index`` of a stored SAE's decoder instead (its site unless ``site`` says so)."""

    site: int | str | None = None
    op: str
    feature: FeatureRef | None = None
    vector: list[Any] | dict[str, Any] | str | None = None
    scale: float | None = None  # add: 1.0; scale: required; the other ops take none
    positions: str | list[int] = "all"
    heads: list[int] | None = None


class LensFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    layers: LayerSpec = "all"
    top_k: int = 5
    tokens: Annotated[list[str], msgspec.Meta(max_length=32)] = []
    tuned: str | None = None  # a stored tuned lens (``POST /probes/{name}?kind=tuned_lens``): its translators first


class StopRule(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    probe: str
    label: str | int
    above: float


REQUEST_FIELDS = [
    RequestField("interventions", Annotated[list[InterventionSpec], msgspec.Meta(max_length=MAX_INTERVENTIONS)]),
    RequestField("logit_lens", LensFields, reads=True),
    RequestField("probes", Annotated[list[NonEmpty], msgspec.Meta(max_length=16)], reads=True),
    RequestField("stop_when", Annotated[list[StopRule], msgspec.Meta(max_length=MAX_STOP_RULES)], generation=True),
]
