"""Generation loops of Liquid's LM on mmfast's decode ops: text-to-image with classifier-free
guidance (Liquid's evaluation/inference_t2i.py) and plain text generation (transformers' generate).

    codes = generate_images(model, prompt_ids, uncond_ids=uncond_ids, num_images=4, seed=0)
    images = vqgan.decode(codes)                    # (4, 3, 512, 512)

Both loops: one prefill of the ragged prompts (no padding stored), then one decode step per
token, each sampled by mmfast.ops.sample. On CUDA the decode step is captured in a CUDA graph
after its first (eager, warm-up) call; see DecodeStep.
"""
from __future__ import annotations

import contextlib
import math
import operator
import threading
import warnings
import weakref
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ... import _backend, ops
from ...ops._checks import is_integer
from .lm import LiquidLM  # its prefill checks the prompts' token ids
from .tokens import LIQUID_IMAGE_TOKEN_OFFSET, LIQUID_NUM_IMAGE_CODES

__all__ = ["DecodeStep", "check_image_generation", "generate_images", "generate_text", "LIQUID_PROMPT_SUFFIX",
           "LIQUID_UNCONDITIONAL_PROMPT"]

# Liquid's text-to-image template (evaluation/inference_t2i.py): the prompt plus this suffix; the
# unconditional rows are this string. Both are tokenized with the tokenizer's BOS.
LIQUID_PROMPT_SUFFIX = " Generate an image based on this description.<boi>"
LIQUID_UNCONDITIONAL_PROMPT = "<unconditional><boi>"


class DecodeStep:
    """model.decode_step(tokens, logits_rows=rows)[:, -1] -> (B, V') fp32, as a callable.

    On the CPU (and on CUDA with cuda_graph=False or under the "reference" backend, whose ops
    synchronise) every call runs eagerly. With device.type == "cuda" the first call runs eagerly on
    the step's own stream (warm-up: allocator, kernel selection), the second captures one decode
    step on that stream into a torch.cuda.CUDAGraph (static token input, the caches and
    cache_seqlens updated in place, static logits output) and replays it, and later calls copy the
    tokens in and replay. These graph calls run under the model's device (a model on another GPU
    than the current one). The returned logits are the graph's static output: consume them before
    the next call. A call whose tokens have another shape or dtype, or after setup_caches replaced
    the caches, warms up and captures again; the weights must stay where they are while a graph is
    held (a model moved or cast after the capture: call close() first). If capture fails (or records
    nothing) the step falls back to eager with a warning; captures take a process-wide lock and
    record in thread-local mode, so threads generating on their own models do not break each
    other's. The CUDA path has not yet been verified on a GPU. close() frees the graph and its
    memory pool (generate_* call it when they finish).

    Every call runs under torch.inference_mode, so the logits are inference tensors (but for a graph
    captured outside it, below): read them, or clone() them to modify them in place or use them with
    autograd. The caches and cache_seqlens are updated in place and keep the kind they were created
    as (normal when setup_caches ran outside inference_mode). Before torch 2.11 a CUDA graph
    captured under inference_mode leaves the CUDA generator's graph state as inference tensors, so
    that a later capture outside it fails (pytorch#166792): there the capture runs outside
    inference_mode (under no_grad) when the caches are normal tensors. Each call counts its tokens
    against the caches' size on the host (model.tokens_held: ValueError when they are full), replays
    and compiled calls included.

    compile=True: the step goes through torch.compile(fullgraph=True) (gpt-fast's recipe: the norms,
    RoPE and residual adds fused, the mmfast ops called as they are); on the CPU with inductor's C++
    wrapper, on CUDA with CUDA graphs by torch (mode="reduce-overhead"'s option) instead of the
    graph above; a dict: also these inductor options (compile_options). The first call compiles
    (about 15-25 s for a 12-layer model on 2 CPU cores, a few seconds when inductor's on-disk cache
    has it; again for a new batch size), so it pays for long generations: generate_text's batch-1
    token of a 138M Llama in fp32 takes ~20 ms eager and ~17 ms compiled on a 2-core AVX-512 AMD
    EPYC (2026-12-05; 11.6 ms of it the step itself).
    """

    def __init__(self, model: LiquidLM, logits_rows: Optional[slice] = None, cuda_graph: bool = True,
                 compile: Union[bool, dict] = False):
        self.model, self.rows = model, logits_rows
        on_cuda = model.device.type == "cuda"
        # The compiled function lives on the model (no bound method of self here: no reference cycle
        # that would keep a closed-over graph and its memory pool alive until a full collection).
        self.compiled = _compiled_step(model, logits_rows, compile) if _compiles(compile) else None
        self.use_graph = cuda_graph and self.compiled is None and on_cuda and _backend.get_backend() != "reference"
        self.calls, self.graph, self.static_tokens, self.static_logits = 0, None, None, None
        self.stream, self.bound_to = None, None

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode_step(tokens, logits_rows=self.rows)[:, -1]

    def eager(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step without a CUDA graph (compiled if the step is), with the checks and token
        count of __call__."""
        with torch.inference_mode():
            return self._decode(tokens) if self.compiled is None else self._compiled_call(tokens)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        # inference_mode rather than no_grad alone: it takes the Autograd dispatch key out of every
        # op call, so the decode ops' Python autograd kernels (register_autograd, ~4.5 us per call
        # even under no_grad) are not entered: 61 op calls per step of a 12-layer model, about 5%
        # of its CPU step (benchmarks/results/2026-12-04-cpu-amd-epyc-2core-avx2-liquid-step-inference-mode.md).
        with torch.inference_mode():
            if self.compiled is not None:
                return self._compiled_call(tokens)
            if not self.use_graph:
                return self._decode(tokens)
            with torch.cuda.device(self.model.device):
                return self._graph_call(tokens)

    def _compiled_call(self, tokens: torch.Tensor) -> torch.Tensor:
        """The compiled step runs no Python check of its own (unless dynamo is off, when
        decode_step counts as well): checked here, and the count set, not added, after it."""
        self.model.check_decode_tokens(tokens, "DecodeStep")
        held = self.model.tokens_held
        try:
            logits = self.compiled(tokens)
        except Exception as error:  # noqa: BLE001 - re-raised unless it is the recompile limit
            if type(error).__name__ not in _RECOMPILE_LIMIT_ERRORS:
                raise
            # raised before the step runs: nothing written
            warnings.warn(f"DecodeStep: torch.compile stopped recompiling the step (each new batch size or cache "
                          f"size compiles it anew; {str(error).splitlines()[0][:160]}); decoding eagerly from now on "
                          "(setup_caches once with the largest batch and length keeps one compilation)")
            self.compiled = None
            return self._decode(tokens)
        self.model.tokens_held = held + tokens.shape[1]
        return logits

    def _graph_call(self, tokens: torch.Tensor) -> torch.Tensor:
        self.model.check_decode_tokens(tokens, "DecodeStep", room=False)
        binding = self._binding(tokens)
        if self.bound_to is not None and self.bound_to != binding:
            self.close()  # new shapes, caches or device: stale pointers in the graph; warm up again
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=self.model.device)
        if self.calls == 0:  # warm-up on the capture stream, as torch.cuda.graphs recommends
            logits = self._on_stream(self._decode, tokens)
            self.calls, self.bound_to = 1, binding
            return logits
        if self.graph is None:
            self.model.check_room(tokens.shape[1], "DecodeStep")  # before the capture, which would swallow it
            ran = self._capture(tokens)  # the capture's Python ran the host-side token count
            if self.graph is None:
                return ran if ran is not None else self._decode(tokens)
        else:
            self.model.hold_tokens(tokens.shape[1], "DecodeStep")
        self.calls += 1
        self.static_tokens.copy_(tokens)
        self.graph.replay()
        return self.static_logits

    def _on_stream(self, fn, tokens):
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn(tokens)
        current.wait_stream(self.stream)
        out.record_stream(current)  # allocated on the step's stream, read on the caller's
        return out

    def _binding(self, tokens: torch.Tensor) -> tuple:
        """What a captured graph holds by address: the device, the token shape and dtype, the caches."""
        caches = [layer.self_attn.kv_cache for layer in self.model.model.layers]
        return (self.model.device, tuple(tokens.shape), tokens.dtype, self.model.cache_seqlens.data_ptr(),
                tuple(t.data_ptr() for cache in caches for t in (cache.k_cache, cache.v_cache)))

    def _capture(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """Captures the step (replay() then runs it). On failure use_graph turns off with a
        warning and the result is this call's logits if its ops ran outside the capture (an
        empty graph, which torch only warns about, or one whose warning was made an error),
        else None (nothing ran: the caller runs the step)."""
        self.static_tokens, self.static_logits = tokens.clone(), None
        graph, previous, held = torch.cuda.CUDAGraph(), torch.cuda.current_stream(), self.model.tokens_held
        lengths = self.model.cache_seqlens.clone()  # a captured step leaves them; one that ran moves them
        mode = torch.inference_mode(False) if _CAPTURE_OUTSIDE_INFERENCE_MODE and not \
            self.model.cache_seqlens.is_inference() else contextlib.nullcontext()
        try:
            with _capture_lock, mode, torch.no_grad():
                # records, does not run: replay() then runs this step
                with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                    self.static_logits = self._decode(self.static_tokens)
        except Exception as err:  # noqa: BLE001 - any capture failure: run eagerly instead
            torch.cuda.set_stream(previous)  # a failed capture_end can leave the capture stream current
            return self._give_up(f"CUDA graph capture failed ({err})", lengths, held)
        if self._ran_since(lengths):
            return self._give_up("the CUDA graph recorded nothing (the step's ops ran outside the capture)",
                                 lengths, held)
        self.graph = graph
        return None

    def _ran_since(self, lengths: torch.Tensor) -> bool:
        """Whether the step ran (its cache_seqlens.add_ happened) since `lengths` was taken."""
        try:
            return not torch.equal(lengths, self.model.cache_seqlens)
        except Exception:  # noqa: BLE001 - a device left in error by the capture: nothing known to have run
            return False

    def _give_up(self, why: str, lengths: torch.Tensor, held: int) -> Optional[torch.Tensor]:
        """Eager from now on; this call's logits if the step ran, else None (the count restored)."""
        ran, self.use_graph, self.static_logits = self.static_logits, False, None
        if not self._ran_since(lengths):
            self.model.tokens_held, ran = held, None
        elif ran is None:
            raise RuntimeError(f"DecodeStep: {why} after part of the step ran; the caches are inconsistent: "
                               "prefill again")
        warnings.warn(f"DecodeStep: {why}; decoding eagerly")
        return ran

    def close(self) -> None:
        """Frees the captured graph, its memory pool and the static tensors; a later call warms
        up and captures again (on the model's device then)."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.static_tokens, self.static_logits, self.bound_to = None, None, None, None
        self.calls, self.stream = 0, None


# Only one capture may be under way in a process (torch.cuda.graph's capture stream is shared).
_capture_lock = threading.Lock()
# pytorch#166792 (fixed in 2.11): a capture under inference_mode breaks later captures outside it.
_CAPTURE_OUTSIDE_INFERENCE_MODE = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 11)


def compile_options(device: torch.device, compile: Union[bool, dict]) -> dict:
    """The inductor options DecodeStep's torch.compile gets: on CUDA CUDA graphs (what
    mode="reduce-overhead" sets), on the CPU inductor's C++ wrapper, which calls the step's
    ~60 kernels and ops without a Python frame each: 0.976-0.980x the batch-1 step time of a
    Llama-138M in three paired runs (AVX-512 AMD EPYC, 2026-12-05), for ~7 s more on the first
    compile (a compile served from inductor's on-disk cache took 1.6 s instead of 3.1 s). A
    dict given as `compile` is merged over these (e.g. {"cpp_wrapper": False})."""
    options = {"triton.cudagraphs": True} if device.type == "cuda" else {"cpp_wrapper": True}
    if isinstance(compile, dict):
        options.update(compile)
    return options


# What a fullgraph torch.compile raises once a function has been recompiled too often (torch
# 2.14's name; older ones said cache limit): matched by name, without importing torch._dynamo.
_RECOMPILE_LIMIT_ERRORS = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")


def _compiled_step(model: LiquidLM, rows: Optional[slice], compile: Union[bool, dict]):
    """torch.compile of one decode step, kept on the model per head-row range and options so that
    every generate call reuses it (a new compiled function per call would recompile)."""
    steps = model.__dict__.setdefault("_compiled_decode_steps", {})
    options = compile_options(model.device, compile)
    key = (None if rows is None else (rows.start, rows.stop), repr(sorted(options.items())))
    if key not in steps:
        def decode(tokens: torch.Tensor) -> torch.Tensor:
            return model.decode_step(tokens, logits_rows=rows)[:, -1]

        steps[key] = torch.compile(decode, fullgraph=True, dynamic=False, options=options)
    return steps[key]


def _compiles(compile: Union[bool, dict]) -> bool:
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be True / False or a dict of inductor options, got {compile!r}")
    return compile is True or isinstance(compile, dict)


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0 or top_k < 0 or not 0 <= top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0, top_k >= 0, 0 <= top_p <= 1; got {temperature}, "
                         f"{top_k}, {top_p}")


def _check_status(invalid: torch.Tensor, what: str) -> None:
    """One synchronisation after the loop: rows whose logits were NaN / +inf / all -inf at some step."""
    if bool(invalid.any()):
        rows = invalid.nonzero().flatten().tolist()
        raise FloatingPointError(f"{what}: the logits of rows {rows[:8]} were NaN, +inf or all -inf at some step "
                                 "(their tokens from then on are 0); check the weights' dtype range and the caches")


def _make_generator(seed: Optional[int], generator: Optional[torch.Generator], device) -> Optional[torch.Generator]:
    if seed is not None and generator is not None:
        raise ValueError("generate: pass seed or generator, not both")
    if seed is None:
        return generator
    try:  # int(1.5), or of a float tensor, would seed 1 silently
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"generate: seed must be an int, got {seed!r}") from None
    return torch.Generator(device=device).manual_seed(seed)


# Caches are (re)allocated with their tokens rounded up to a multiple of this: a compiled step
# (static shapes) and a captured CUDA graph are rebuilt when a prompt outgrows the caches, and a
# loop over prompts one token longer each would otherwise rebuild them every time (and a compiled
# step past torch's recompile limit of 8 stops working). At most 255 idle tokens per row (Liquid-7B
# in bf16: 448 KiB of keys and values per token and row, so up to 117 MB per row; setup_caches
# sizes them exactly when called directly).
CACHE_TOKEN_MULTIPLE = 256


def _ensure_caches(model: LiquidLM, batch: int, tokens: int, stacklevel: int = 3) -> None:
    """setup_caches(batch, tokens rounded up to CACHE_TOKEN_MULTIPLE) unless the caches already
    hold that many rows and tokens, in the model's dtype and device, writable here (not made under
    torch.inference_mode() when this call runs outside it). Warns when `tokens` passes the
    config's max_position_embeddings (positions the model was not trained on; it still runs)."""
    trained = model.config.max_position_embeddings
    if trained is not None and tokens > trained:
        warnings.warn(f"LiquidLM: this generation reaches position {tokens - 1}, past the model's trained context "
                      f"(max_position_embeddings = {trained}): its output there may degrade", stacklevel=stacklevel)
    shape = model.cache_shape()
    cache = model.model.layers[0].self_attn.kv_cache
    if (shape is None or shape[0] < batch or shape[1] < tokens or cache.k_cache.dtype != model.dtype
            or cache.k_cache.device != model.device or model.caches_need_inference_mode()):
        model.setup_caches(batch, -(-tokens // CACHE_TOKEN_MULTIPLE) * CACHE_TOKEN_MULTIPLE)


_generation_locks: "weakref.WeakKeyDictionary[LiquidLM, threading.Lock]" = weakref.WeakKeyDictionary()
_generation_locks_lock = threading.Lock()


@contextlib.contextmanager
def _one_generation(model: LiquidLM, what: str):
    """RuntimeError when another thread is generating with `model`: its static KV cache holds one
    generation at a time (several threads on one model failed with a misleading cache-size
    error, or would have mixed their caches)."""
    with _generation_locks_lock:
        lock = _generation_locks.setdefault(model, threading.Lock())
    if not lock.acquire(blocking=False):
        raise RuntimeError(f"{what}: this LiquidLM is generating in another thread, and its static KV cache holds one "
                           "generation at a time: give each thread its own model (copy.deepcopy(model) shares no "
                           "cache)")
    try:
        yield
    finally:
        lock.release()


def _as_ids(name: str, ids) -> torch.Tensor:
    """A 1-D int64 CPU tensor of token ids from a list, a (L,) or a (1, L) tensor."""
    if isinstance(ids, str):
        raise TypeError(f"generate_images: {name} must be token ids, got the text {ids[:40]!r}: tokenize it first "
                        "(Liquid: tokenizer(prompt + LIQUID_PROMPT_SUFFIX).input_ids, see examples/liquid_generate.py)")
    if isinstance(ids, (list, tuple)) and len(ids) == 0:
        raise ValueError(f"generate_images: {name} must be a non-empty 1-D sequence of token ids, got an empty "
                         f"{type(ids).__name__}")
    ids = torch.as_tensor(ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
        raise ValueError(f"generate_images: {name} must be a non-empty 1-D sequence of token ids, got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    return ids.long().cpu()


def _right_padded(rows: Sequence[torch.Tensor], pad: int = 0):
    """(B, S) int64 right-padded tokens and (B,) int32 lengths of 1-D id tensors."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    tokens = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.int64)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = r
    return tokens, lengths


def check_image_generation(*, image_tokens: int, num_images: int, temperature: float, top_k: int,
                           top_p: float) -> None:
    """The checks generate_images makes of its numbers, for a caller that wants them before loading
    a model (examples/liquid_generate.py): ValueError unless image_tokens is a positive square
    (the codes form a side x side grid), num_images >= 1, temperature >= 0, top_k >= 0 and
    0 <= top_p <= 1; TypeError when a count is not an int."""
    _check_counts("generate_images", image_tokens=image_tokens, num_images=num_images, top_k=top_k)
    side = math.isqrt(max(image_tokens, 0))
    if image_tokens < 1 or side * side != image_tokens:
        raise ValueError(f"generate_images: image_tokens must be a positive square number (1024 = 32 x 32), got "
                         f"{image_tokens}")
    if num_images < 1:
        raise ValueError(f"generate_images: num_images must be >= 1, got {num_images}")
    _check_sampling(temperature, top_k, top_p)


@torch.no_grad()
def _check_counts(what: str, **counts) -> None:
    for name, value in counts.items():
        if not is_integer(value):
            raise TypeError(f"{what}: {name} must be an int, got {value!r}")


def generate_images(model: LiquidLM, prompt_ids, *, cfg_scale: Optional[float] = 7.0, temperature: float = 0.99,
                    top_k: int = 4096, top_p: float = 0.96, num_images: int = 4, image_tokens: int = 1024,
                    seed: Optional[int] = None, generator: Optional[torch.Generator] = None, uncond_ids=None,
                    image_vocab_start: int = LIQUID_IMAGE_TOKEN_OFFSET,
                    image_vocab_size: int = LIQUID_NUM_IMAGE_CODES, progress: bool = True,
                    cuda_graph: bool = True, compile: Union[bool, dict] = False) -> torch.Tensor:
    """Liquid's text-to-image loop: (num_images, side, side) int64 VQGAN codes, side = sqrt(image_tokens).

    prompt_ids: the conditional prompt's token ids (list, (L,) or (1, L)), already in Liquid's
    template: tokenizer(prompt + LIQUID_PROMPT_SUFFIX) with BOS. uncond_ids: the unconditional
    prompt's ids, required when cfg_scale is set; Liquid uses tokenizer("<unconditional><boi>")
    = [<bos>, <unconditional>, <boi>] (LIQUID_UNCONDITIONAL_PROMPT; <boi> and <unconditional>
    reuse Gemma's <unused*> ids). The batch is num_images conditional rows, then num_images
    unconditional rows, each with its own length (the short unconditional prompt is not padded).

    Each of the image_tokens steps computes logits of the image rows
    [image_vocab_start, image_vocab_start + image_vocab_size) of the head only, then
    mmfast.ops.sample(logits, cfg_scale, temperature, top_k, top_p, generator): Liquid's order
    (CFG mix uncond + scale * (cond - uncond) of the raw logits, temperature, top-k, top-p,
    draw; restricting to the image rows equals Liquid's masking of the text logits to -inf).
    The sampled code is fed to both rows of its pair. cfg_scale=None, or a scale <= 1 (Liquid's
    scripts guide only when guidance_scale > 1): no unconditional rows, the conditional logits
    are sampled. The defaults are Liquid's evaluation settings (evaluation/inference_t2i.py and
    T2I_Eval: CFG 7.0, temperature 0.99, top-k 4096, top-p 0.96); its app.py demo samples at
    temperature 0.9, top-p 0.99. Unlike Liquid's sampler, which masks the text logits only when
    top-k or top-p filters (with both off it samples the whole vocabulary and clamps a text token
    to code 0), every draw here is among the image codes; and at the top-k / top-p cut a tie
    group is kept whole and a value whose larger values' mass equals top_p exactly is dropped
    (mmfast.ops.sample's boundaries; Liquid's sort keeps part of a tie group, and that value).
    temperature 0: greedy. seed or generator (on the model's device): reproducible draws. One
    prompt per call (as Liquid's scripts, num_images rows of it): loop over prompts.
    Like Liquid, exactly image_tokens steps and no early stop. Codes are in [0, image_vocab_size)
    and ready for mmfast.models.liquid.VQGAN.decode. The caches are (re)allocated when too small (their
    tokens rounded up to CACHE_TOKEN_MULTIPLE, 256: a loop over prompts compiles / captures once)
    and left as the loop leaves them (cache_seqlens = prompt lengths + image_tokens - 1).
    cuda_graph: on CUDA, replay the decode step as a CUDA graph after its first call (DecodeStep;
    not run on a GPU yet). compile: torch.compile the decode step (True, or a dict of inductor
    options merged over mmfast's: DecodeStep; worth its 15-25 s of compilation for long
    generations on a CPU).
    """
    check_image_generation(image_tokens=image_tokens, num_images=num_images, temperature=temperature, top_k=top_k,
                           top_p=top_p)
    if image_vocab_start < 0 or image_vocab_size < 1 or image_vocab_start + image_vocab_size > model.config.vocab_size:
        raise ValueError(f"generate_images: image rows [{image_vocab_start}, {image_vocab_start + image_vocab_size}) "
                         f"are outside the model's vocabulary of {model.config.vocab_size}")
    rows = [_as_ids("prompt_ids", prompt_ids)] * num_images
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise ValueError(f"generate_images: cfg_scale must be finite (or None), got {cfg_scale!r}")
    if cfg_scale is not None and cfg_scale <= 1:  # Liquid: `if guidance_scale > 1` guides, else not
        cfg_scale = None
    if cfg_scale is not None:
        if uncond_ids is None:
            raise ValueError("generate_images: cfg_scale needs uncond_ids, the ids of Liquid's unconditional prompt "
                             f"tokenizer({LIQUID_UNCONDITIONAL_PROMPT!r}) (with BOS)")
        rows += [_as_ids("uncond_ids", uncond_ids)] * num_images
    tokens, lengths = _right_padded(rows)
    device, head = model.device, slice(image_vocab_start, image_vocab_start + image_vocab_size)
    generator = _make_generator(seed, generator, device)
    with _one_generation(model, "generate_images"):
        _ensure_caches(model, len(rows), tokens.shape[1] + image_tokens)

        step = DecodeStep(model, head, cuda_graph, compile)  # before the prefill: a bad `compile` leaves the caches
        logits = model.prefill(tokens.to(device), lengths.to(device), logits_rows=head)  # (2n, image_vocab_size)
        codes = torch.empty((num_images, image_tokens), dtype=torch.int64, device=device)
        invalid = torch.zeros(num_images, dtype=torch.int32, device=device)
        try:
            for i in tqdm(range(image_tokens), desc="image tokens", disable=not progress):
                codes[:, i], status = ops.sample(logits, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                                                 top_p=top_p, generator=generator, return_status=True)
                invalid |= status
                if i + 1 < image_tokens:  # the last code is never fed back (Liquid's loop)
                    pair = codes[:, i] if cfg_scale is None else codes[:, i].repeat(2)
                    logits = step((pair + image_vocab_start)[:, None])
        finally:
            step.close()
        _check_status(invalid, "generate_images")
        side = math.isqrt(image_tokens)  # a square: checked above
        return codes.view(num_images, side, side)


def _strip_left_padding(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
    """Left-padded (B, S) ids + mask -> right-padded (B, S) ids and (B,) int32 lengths."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"generate_text: input_ids must be a (B, S) integer tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"generate_text: input_ids must be a (B, S) integer tensor, got {input_ids.dtype} of shape "
                         f"{tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    if batch == 0 or seq == 0:
        raise ValueError(f"generate_text: input_ids must hold at least one row and one token, got shape "
                         f"{tuple(input_ids.shape)}")
    if attention_mask is None:
        return input_ids.long(), torch.full((batch,), seq, dtype=torch.int32)
    mask = torch.as_tensor(attention_mask, device=input_ids.device).long()  # a nested list too, as transformers
    if mask.shape != input_ids.shape:
        raise ValueError(f"generate_text: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(mask.shape)}")
    if ((mask != 0) & (mask != 1)).any() or (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("generate_text: attention_mask must be a (B, S) 0/1 mask of a LEFT-padded batch "
                         "(zeros, then ones, in every row)")
    lengths = mask.sum(1)
    if int(lengths.min()) < 1:
        raise ValueError("generate_text: every row needs at least one token")
    index = (torch.arange(seq, device=mask.device)[None] + (seq - lengths)[:, None]).clamp(max=seq - 1)
    return input_ids.long().gather(1, index), lengths.int()


@torch.no_grad()
def generate_text(model: LiquidLM, input_ids: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
                  max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, generator: Optional[torch.Generator] = None,
                  eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None,
                  progress: bool = False, cuda_graph: bool = True, compile: Union[bool, dict] = False) -> torch.Tensor:
    """transformers' generate for a LEFT-padded batch: returns the new tokens (B, N) int64, N <= max_new_tokens.

    input_ids (B, S) with attention_mask (B, S) (1: token, 0: left padding; None: no padding; a
    tensor or nested list).
    The padding is stripped into per-row lengths, so each row gets exactly what its prompt gets
    alone (and what transformers gives the padded batch). do_sample=False: greedy (argmax,
    mmfast.ops.sample with temperature 0); do_sample=True: temperature, then top_k (0: off),
    then top_p (1: off), transformers' TemperatureLogitsWarper -> TopKLogitsWarper ->
    TopPLogitsWarper, drawn with `generator` (mmfast.ops.sample: a temperature in (0, 1e-5) is
    raised to 1e-5 as Liquid does, where TemperatureLogitsWarper divides by it; temperature 0
    samples greedily, where transformers refuses it; ties at the top-k / top-p cut kept whole).
    Note transformers' own defaults differ (top_k 50 when unset): pass the same values to both. eos_token_id (int, list or tensor): a row that emitted
    it continues with pad_token_id (default: the first eos id), and the loop stops when every
    row has (a host synchronisation per step), as transformers does. cuda_graph and compile as
    in generate_images.
    """
    _check_counts("generate_text", max_new_tokens=max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"generate_text: max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_counts("generate_text", top_k=top_k)
    _check_sampling(temperature if do_sample else 0.0, top_k, top_p)
    tokens, lengths = _strip_left_padding(input_ids, attention_mask)
    device = model.device
    eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=device).reshape(-1).long()
    pad = pad_token_id if pad_token_id is not None else (None if eos is None else int(eos[0]))
    batch = tokens.shape[0]
    with _one_generation(model, "generate_text"):
        _ensure_caches(model, batch, tokens.shape[1] + max_new_tokens, stacklevel=4)  # under torch.no_grad's wrapper

        step = DecodeStep(model, None, cuda_graph, compile)  # before the prefill: a bad `compile` leaves the caches
        logits = model.prefill(tokens.to(device), lengths.to(device))
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        invalid = torch.zeros(batch, dtype=torch.int32, device=device)
        greedy_uniform = None if do_sample else torch.zeros(batch, device=device)  # no random draw when greedy
        out = []
        try:
            for i in tqdm(range(max_new_tokens), desc="tokens", disable=not progress):
                new, status = ops.sample(logits, temperature=temperature if do_sample else 0.0, top_k=top_k,
                                         top_p=top_p, generator=generator if do_sample else None,
                                         uniform=greedy_uniform, return_status=True)
                invalid |= status
                if eos is not None:
                    new = torch.where(finished, torch.full_like(new, pad), new)
                    finished |= torch.isin(new, eos)
                out.append(new)
                if i + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                    break
                logits = step(new[:, None])
        finally:
            step.close()
        _check_status(invalid, "generate_text")
        return torch.stack(out, dim=1)
