"""Plain data shared between the kernel and plugins.

Tensors are typed as ``Any`` so that importing this module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs

PositionSpec = Literal["last", "all", "prompt", "generated"] | list[int]


@attrs.define(frozen=True)
class ModelRef:
    """What the kernel knows about a model before any plugin touches its weights."""

    id: str
    revision: str | None = None
    path: Path | None = None
    config: dict[str, Any] | None = None
    modules: list[dict[str, Any]] | None = None
    manifest: dict[str, Any] | None = None
    files: tuple[str, ...] = ()
    source: str = "local"  # local | shipped (by a plugin) | hf-cache | config (a custom_models entry of the config)
    hub_id: str | None = None  # the hub id behind ``id`` when that is an alias

    @property
    def load_target(self) -> str:
        """What to hand ``from_pretrained``: the directory when it is complete, else the hub id."""
        if self.path is not None and self.source != "hf-cache":
            return str(self.path)
        return self.hub_id or self.id

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        return (self.config or {}).get("quantization_config")

    @property
    def architectures(self) -> list[str]:
        return list((self.config or {}).get("architectures") or [])


@attrs.define(frozen=True)
class ProbeResult:
    """One plugin's opinion of how well it can load a model (score 0..1) and why."""

    loader: str
    score: float
    reason: str


@attrs.define(frozen=True)
class QuantizationPlan:
    """Load arguments a quantize plugin produces for a method name."""

    method: str
    load_kwargs: dict[str, Any] = attrs.field(factory=dict)
    provider: str = ""


@attrs.define(frozen=True)
class LoadOptions:
    device: str = "cpu"
    dtype: str = "auto"
    quantization: str | None = None
    quantization_plan: QuantizationPlan | None = None
    device_map: str | None = None
    trust_remote_code: bool = False


@attrs.define
class LoadedModel:
    """A model in memory, as a loader plugin hands it to the kernel."""

    ref: ModelRef
    loader: str
    model: Any
    tokenizer: Any
    options: LoadOptions
    num_layers: int
    hidden_size: int  # the width of the residual stream: of every hidden-state index, but N where final_width says
    kind: Literal["causal", "encoder", "embedding", "custom"] = "causal"
    device: str = "cpu"
    dtype: str = "float32"
    size_bytes: int = 0
    load_seconds: float = 0.0
    max_context: int | None = None
    # The width of hidden-state index N where it is not ``hidden_size``: what the head reads, mapped out of the
    # stream (OPT-350m's project_out). None: ``hidden_size``.
    final_width: int | None = None
    # kind "embedding": the loader has the model's own pooling pipeline and fills ``SequenceOutput.pooled``.
    # The pool strategy the model was trained with (a sentence-transformers Pooling module's mode, as a name the
    # pool hook knows); /embed uses it when a request names none. None: the kernel's default for ``kind``.
    default_pooling: str | None = None
    # Whether ``SequenceOutput.pooled`` comes out unit-length (the model's own pipeline ends in Normalize).
    pooled_normalized: bool = False
    # The loader honours ``Batch.row_generation``: the kernel may then batch generations whose parameters differ.
    row_params: bool = False
    # The model's declared parts (``ModelParts``): where a loader sets them and no runner, the kernel runs the model.
    parts: ModelParts | None = None
    # How the model runs (``Runner``): the kernel's default ``forward_with_states`` calls ``runner.forward``, so a
    # loader that sets one needs no hook of its own, and one that loads through another's (GPTQ through transformers)
    # keeps the other's runner.
    runner: Runner | None = None
    # The token ids that end a generation (EOS): the kernel stops a row that picks one.
    stop_ids: frozenset[int] = frozenset()
    # ``decoder(attention: bool) -> Decoder``: the loader runs generations step by step, and the kernel's scheduler
    # lets requests join a running generation (continuous batching). None: each generation runs whole through
    # ``forward_with_states``, and the model's other requests wait for it.
    decoder: Callable[[bool], Decoder] | None = None
    # Hook points beyond the hidden-state indices, by TransformerLens's names (``blocks.3.hook_attn_out``), each with
    # its per-token shape; the loader then captures them and applies ``Batch.interventions``. None: neither.
    sites: dict[str, tuple[int, ...]] | None = None
    # The points of ``sites`` computed inside the attention function (scores, pattern): a pass that reads or edits
    # one runs another attention implementation, whose low-precision numbers are not the model's own attention's,
    # so the kernel never merges it with a pass that touches none.
    attention_sites: frozenset[str] = frozenset()
    # ``unembed(states [P, H], normalized) -> logits [P, V]``: the model's own final norm (skipped when
    # ``normalized``) and LM head, soft-capping included, on CPU float tensors (the logit lens). None: no LM head.
    unembed: Callable[[Any, bool], Any] | None = None
    # The loader takes ``Capture.gradient`` (gradients of a logit metric at captured states, attribution patching).
    gradients: bool = False
    # Direct logit attribution (``Attribution``): the components the stream is the sum of, and the model's frozen
    # final norm and head as a linear map. None: not offered.
    attribution: Attribution | None = None
    # ``weights(names) -> {name: CPU tensor}`` by the model's own parameter names and TransformerLens's names where
    # the mapping is exact; ``weights(None)`` lists every name with its shape and dtype without materialising any,
    # and each name it does not serve (a TransformerLens name this model has no exact weight for) with why, a string.
    weights: Callable[[Sequence[str] | None], dict[str, Any]] | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    @property
    def can_generate(self) -> bool:
        return self.kind == "causal"


class Attribution(Protocol):
    """Direct logit attribution for a loader: ``sites(kind)`` are the points to capture at one position (``kind``
    "layers" or "heads"); ``decompose(states, kind)`` turns those states [P, ...] into the components the last
    block's output is the sum of, as ``[(site, head or None, vectors [P, D])]`` (each head's output through any
    norm the model applies to the attention's output, frozen at its value for the position); ``logit_map(states,
    tokens)`` gives (directions [P, k, D], constants [P, k]) with the model's logit of each token (before any
    soft-capping) equal to directions . x + constants for x the last block's output at the position, its final norm
    frozen (TransformerLens's ``apply_ln_to_stack``); ``softcap``: the soft-capping that follows, or None."""

    softcap: float | None

    def sites(self, kind: str) -> list[str]: ...

    def decompose(self, states: dict[str, Any], kind: str) -> list[tuple[str, int | None, Any]]: ...

    def logit_map(self, states: dict[str, Any], tokens: Sequence[int]) -> tuple[Any, Any]: ...


@attrs.define(frozen=True)
class ModelParts:
    """What a loader declares of its model so that the kernel runs it (``LoadedModel.parts``): ``blocks``, the list of
    its blocks in order (a ``torch.nn.ModuleList``: hidden-state index ``i`` is block ``i``'s input, ``N`` the final
    norm's output); ``final_norm``, the norm after the last block (None: the last block's output is index ``N``);
    ``lm_head``, states -> logits, of a causal model, whose own call on token ids ``[1, T]`` gives logits
    ``[1, T, V]``. The kernel then gives the model capture and edits at hidden-state indices, the logit lens, and
    (causal) generation through the scheduler."""

    blocks: Any
    final_norm: Any = None
    lm_head: Any = None


class Runner(Protocol):
    """How a loader runs its model, on the model's thread."""

    def forward(self, batch: Batch, capture: Capture) -> ForwardOutput:
        """One padded pass of ``batch``'s rows (or their whole generation), capturing what ``capture`` asks."""


@attrs.define(eq=False)
class RowInput:
    """A generated row as its loader sees it when it joins the running batch: its id (the kernel's), its prompt's
    token ids, what to capture of its tokens, and its edits."""

    id: int
    prompt: list[int]
    capture: Capture
    edits: tuple[Intervention, ...] = ()


@attrs.define(eq=False)
class StepOutput:
    """What one pass of a running batch gives the kernel: for each row of ``ids``, the logits of its last position
    (``logits`` [len(ids), V], on the model's device, in that order) and, in ``states[id]`` and ``attentions[id]``
    (CPU tensors), what its capture asks of the tokens this pass fed: ``[fed, ...]`` per layer index or hook point
    (the last one only for a capture of "last"), and attention ``[heads, fed, keys so far]`` per layer index.
    ``fills``: for a point whose last dimension grows with the keys (scores, patterns), what a later key holds."""

    ids: list[int]
    logits: Any
    states: dict[int, dict[int | str, Any]] = attrs.field(factory=dict)
    attentions: dict[int, dict[int, Any]] = attrs.field(factory=dict)
    fills: dict[int | str, float] = attrs.field(factory=dict)


class Decoder(Protocol):
    """A model's running batch of generated rows, owned by its loader, on the model's thread. The kernel decides
    which rows join, step and leave, chooses every token and reads what the passes give; the loader only runs them:
    ``prefill`` feeds joining rows their prompts (a pass over just those rows) and adds them to the batch, ``step``
    feeds each running row the token the kernel chose, ``release`` takes rows out. Each row computes exactly what
    it computes alone."""

    @property
    def joinable(self) -> bool:
        """Rows may join the running ones now (some caches let rows join only an empty batch)."""

    def prefill(self, rows: list[RowInput]) -> StepOutput:
        """Feed ``rows`` their prompts and add them to the running batch."""

    def step(self, feed: dict[int, int]) -> StepOutput:
        """Feed every running row (row id -> token) its next token."""

    def release(self, ids: list[int]) -> None:
        """Take rows out of the batch (finished, failed or abandoned)."""

    def close(self) -> None:
        """Release hooks and the cache."""


@attrs.define(frozen=True)
class LayerSel:
    """A requested layer: the key as the user wrote it and its index in ``output_hidden_states`` space."""

    key: str
    index: int


@attrs.define(frozen=True, eq=False)
class Intervention:
    """One edit of the activation at ``site`` as it flows on: an int is a hidden-state index (0..N, the state that
    index reports, on its way to the next block), a str a name of ``LoadedModel.sites``.

    ``op``: add (h + scale * vector), set (vector), scale (scale * h), ablate (h minus its projection on the rows of
    ``vector``, an orthonormal basis [k, D]), zero. ``vector`` is a CPU float32 tensor [D], or [P, D] with one row
    per entry of a list of ``positions``; D is the site's last dimension. ``positions``: "all", "prompt",
    "generated" or token indices of the final sequence (negative: from the end of the prompt). ``heads``: the heads
    an edit at a per-head point ([heads, ...]: ``attn.hook_z``, ``hook_pattern``, ...) touches (None: all).
    """

    site: int | str
    op: str
    vector: Any = None
    scale: float = 1.0
    positions: PositionSpec = "all"
    heads: tuple[int, ...] | None = None


@attrs.define(frozen=True)
class Gradient:
    """A metric of the last position's logits whose gradient a pass takes (``Capture.gradient``): ``"logit_diff"``,
    logit(tokens[0]) - logit(tokens[1]), or ``"logprob"``, log-softmax(tokens[0]); summed over the batch's rows (which
    never interact, so each row's gradient is its own)."""

    metric: Literal["logit_diff", "logprob"]
    tokens: tuple[int, ...]


@attrs.define(frozen=True)
class Capture:
    """What to keep besides the tokens, resolved against the model by the kernel.

    ``layers`` and ``positions`` select hidden states (when ``states``) and attention weights (when
    ``attention``: the attention of the block that produces each layer, for the same query positions; index 0,
    the embedding output, has none). ``top_logprobs``: per generated step, the chosen token's log-probability
    and the ``top_logprobs`` most likely alternatives (None: no log-probabilities). ``logits``: keep each
    generated step's raw logits (a forward pass: the logits at ``positions``, where the loader has an LM head).
    ``stream_states``: pass each generated token's states to ``Batch.on_token``.
    """

    layers: tuple[LayerSel, ...] = ()
    sites: tuple[str, ...] = ()  # names of LoadedModel.sites, captured like layers (states keyed by the name)
    positions: PositionSpec = "last"
    states: bool = True
    attention: bool = False
    top_logprobs: int | None = None
    logits: bool = False
    stream_states: bool = False
    # A forward pass with gradients (attribution patching): each row's ``gradients[key]`` is d metric / d state at
    # every captured layer and site, [T, ...] like its states, and ``logits`` are at every position it keeps (the
    # last, the metric's, among them); the model's parameters stay frozen and no graph outlives the pass. Only for a
    # loader whose model sets ``LoadedModel.gradients``.
    gradient: Gradient | None = None

    @property
    def indices(self) -> list[int]:
        return sorted({sel.index for sel in self.layers})

    @property
    def wanted(self) -> bool:
        """Whether any per-position tensor (states or attention) is asked for."""
        return bool(self.layers or self.sites) and (self.states or self.attention)

    @property
    def wants_states(self) -> bool:
        return bool(self.layers or self.sites) and self.states

    def kept_positions(self, total: int) -> list[int]:
        """The positions a loader returns rows for in a sequence of ``total`` tokens: the last for "last", every
        one otherwise (the kernel slices the rest), none when nothing per position is asked for."""
        if not self.wanted:
            return []
        return [total - 1] if self.positions == "last" else list(range(total))

    @property
    def attention_layers(self) -> tuple[LayerSel, ...]:
        return tuple(sel for sel in self.layers if sel.index > 0) if self.attention else ()


@attrs.define(frozen=True)
class GenerationParams:
    """``fit_context``: ``max_tokens`` is the default, not the request's: generate up to it or to the end of the
    model's context, whichever comes first, instead of refusing a model whose context is shorter."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    fit_context: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@attrs.define(frozen=True)
class Batch:
    """Inputs for one forward pass or one generation: texts, already-tokenized ids, or both.

    ``generation`` is None for a plain forward pass (/extract, /embed). ``row_generation``: one GenerationParams per
    row when the rows of a generation differ (requests merged by the kernel; only for a model whose loader sets
    ``LoadedModel.row_params``), else None and every row uses ``generation``. ``truncate``: cut a row longer than the
    model's limit (``LoadedModel.max_context``) to it and mark it ``SequenceOutput.truncated``, instead of the
    InvalidField a too-long row otherwise is (the embedding endpoints' ``truncate`` field).
    """

    texts: tuple[str, ...] = ()
    token_ids: tuple[tuple[int, ...], ...] | None = None
    generation: GenerationParams | None = None
    add_special_tokens: bool = True
    # callable(row: int, token_id: int, piece: str, extras: dict) -> bool | str | None; False stops the row, a string
    # stops it with that finish reason. ``extras``
    # holds "states" ({key: tensor [1, H]}, with Capture.stream_states) and "logprob" (with Capture.top_logprobs).
    on_token: Any = None
    truncate: bool = False
    row_generation: tuple[GenerationParams, ...] | None = None
    # One tuple of edits per row, applied in order (only for a model whose loader sets ``LoadedModel.sites``); empty:
    # no row is edited.
    interventions: tuple[tuple[Intervention, ...], ...] = ()

    def params(self, row: int) -> GenerationParams:
        """Row ``row``'s generation parameters (a generation only)."""
        assert self.generation is not None
        return self.row_generation[row] if self.row_generation is not None else self.generation

    def edits(self, row: int) -> tuple[Intervention, ...]:
        return self.interventions[row] if self.interventions else ()

    @property
    def size(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else len(self.texts)


@attrs.define(frozen=True)
class Reading:
    """What a request's ``interventions`` and readouts (``logit_lens``, ``probes``, ``stop_when``) ask of one model,
    resolved by the plugin that implements the ``readouts`` hook: the edits for every row, the extra states to
    capture (layer indices keyed by the index, hook points by name: the answer's ``hidden_states`` show only the
    keys the request asked for),
    ``read(states, positions)``: answer fields from one row's captured states [P, ...] at those positions (a token
    event's one state has no positions; a stream puts them in every token's event), and ``stop(states)``: the stop
    rule a generated token's states fire, or None."""

    edits: tuple[Intervention, ...] = ()
    layers: tuple[LayerSel, ...] = ()
    sites: tuple[str, ...] = ()
    read: Callable[[dict[str, Any], list[int] | None], dict[str, Any]] | None = None
    stop: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
    # An upper bound of the JSON bytes ``read`` adds to an answer for one position (the answer's size estimate).
    bytes_per_position: int = 0

    @property
    def keys(self) -> list[str]:
        """The keys of the states ``read`` and ``stop`` take."""
        return [*(sel.key for sel in self.layers), *self.sites]


@attrs.define(frozen=True)
class RequestField:
    """A field a plugin adds to the capture requests (the ``request_fields`` hook): its name and msgspec type; a
    request's value (None when absent) reaches the plugin's ``readouts`` hook. ``generation``: only generating
    requests take it; ``reads``: it answers at the request's positions (so ``positions`` shapes its answer)."""

    name: str
    type: Any
    generation: bool = False
    reads: bool = False


@attrs.define
class SequenceOutput:
    """One row of a batch after the pass: its tokens, its text and the captured states.

    ``states[key]`` is a CPU float tensor [len(positions), H] whose rows are the tokens at ``positions``
    of the final sequence (prompt + generated); ``attentions[key]`` is [heads, len(positions), len(token_ids)]
    for the same rows (zero above the causal diagonal). ``logprobs``: one entry per generated token,
    ``{"token_id", "logprob", "top": [[id, logprob], ...]}`` (log-softmax of the raw logits, before temperature or
    top-k/p); ``logits`` a CPU float tensor [generated, vocab] (a forward pass: [positions, vocab]). ``pooled``
    is the model's own sentence embedding (a CPU float tensor [D]) when its loader has a pooling pipeline
    (sentence-transformers), else None.
    ``truncated``: the input was cut to the model's limit (only when ``Batch.truncate`` allowed it).
    """

    token_ids: list[int]
    prompt_tokens: int
    text: str = ""
    finish_reason: str | None = None
    positions: list[int] = attrs.field(factory=list)
    states: dict[str, Any] = attrs.field(factory=dict)
    pooled: Any = None
    truncated: bool = False
    attentions: dict[str, Any] = attrs.field(factory=dict)
    logprobs: list[dict[str, Any]] = attrs.field(factory=list)
    logits: Any = None
    gradients: dict[str, Any] = attrs.field(factory=dict)  # with ``Capture.gradient``: keyed like ``states``

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_tokens :]


@attrs.define
class ForwardOutput:
    rows: list[SequenceOutput]


@attrs.define(frozen=True)
class Transport:
    """A named way to serve the ASGI app: ``bind()`` returns the listening sockets for this process's server,
    ``cleanup()`` undoes it; or ``serve()`` runs the app somewhere else."""

    name: str
    describe: str
    bind: Any = None  # callable() -> list[socket.socket]
    cleanup: Any = None  # callable() -> None
    # callable() -> int: a transport that runs the app itself, elsewhere (Ray Serve's replicas), until a signal;
    # it serves alone and ``bind`` is not called.
    serve: Any = None
