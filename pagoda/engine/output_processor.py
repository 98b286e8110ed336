"""Turns engine-core outputs into RequestOutputs: detokenization, stop strings, logprobs,
output kinds (cumulative, delta, final only) and the fan-in of `n > 1` samples."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pagoda.engine.detokenizer import IncrementalDetokenizer, find_stop_string, withheld_chars
from pagoda.engine.messages import EngineCoreOutput, LogprobsRow
from pagoda.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class ParentState:
    """One user request; its `n` samples run in the core as child requests."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    children: dict[int, "ChildState"] = field(default_factory=dict)
    prompt_logprobs: Optional[list] = None
    num_cached_tokens: int = 0
    num_finished: int = 0  # children with a finish reason (kept, not recounted per output)

    def finished(self) -> bool:
        return self.num_finished == len(self.children)


@dataclass
class ChildState:
    core_id: str
    index: int
    parent: ParentState
    detok: Optional[IncrementalDetokenizer]
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    text: str = ""
    sent_text: int = 0  # characters / tokens already returned in DELTA mode
    sent_tokens: int = 0

    def finish(self, reason: str, stop_reason) -> None:
        if self.finish_reason is None:
            self.parent.num_finished += 1
        self.finish_reason, self.stop_reason = reason, stop_reason

    def text_so_far(self) -> str:
        """The text, decoding now what a final-only request defers to its end (an aborted
        request's last output needs it)."""
        if self.detok is not None and self.detok.defer:
            self.text = self.detok.full_text()
        return self.text


class OutputProcessor:
    def __init__(self, tokenizer: Optional[Any]):
        self.tokenizer = tokenizer
        self.children: dict[str, ChildState] = {}
        self.parents: dict[str, ParentState] = {}

    def add_request(self, parent_id: str, core_id: str, index: int, prompt: Optional[str],
                    prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float) -> None:
        parent = self.parents.get(parent_id)
        if parent is None:
            parent = ParentState(parent_id, prompt, prompt_token_ids, params,
                                 RequestMetrics(arrival_time))
            self.parents[parent_id] = parent
        detok = None
        if params.detokenize and self.tokenizer is not None:
            # Text nobody reads before the end is decoded once, at the end.
            defer = params.output_kind == RequestOutputKind.FINAL_ONLY and not params.stop
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params, defer)
        child = ChildState(core_id, index, parent, detok,
                           logprobs=[] if params.logprobs is not None else None,
                           cumulative_logprob=0.0 if params.logprobs is not None else None)
        parent.children[index] = child
        self.children[core_id] = child

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def core_ids_of(self, parent_id: str) -> list[str]:
        parent = self.parents.get(parent_id)
        return [c.core_id for c in parent.children.values()] if parent else []

    def abort(self, parent_ids: list[str]) -> list[str]:
        """Forgets the requests; returns the core ids the engine core must abort."""
        core_ids = []
        for parent_id in parent_ids:
            parent = self.parents.pop(parent_id, None)
            for child in parent.children.values() if parent else ():
                self.children.pop(child.core_id, None)
                if child.finish_reason is None:
                    core_ids.append(child.core_id)
        return core_ids

    def process_outputs(self, outputs: list[EngineCoreOutput]
                        ) -> tuple[list[RequestOutput], list[str]]:
        """Returns the RequestOutputs to hand to users and the core ids to abort (stop
        strings are found here, after the core has produced the token)."""
        results, to_abort = [], []
        now = time.time()
        for out in outputs:
            child = self.children.get(out.request_id)
            if child is None:
                continue  # aborted by the user meanwhile
            stopped_by_string = self._update_child(child, out)
            if stopped_by_string and out.finish_reason is None:
                to_abort.append(child.core_id)
            self._update_metrics(child.parent, now, out)
            request_output = self._make_output(child)
            if child.finish_reason is not None:
                self.children.pop(child.core_id, None)
            if child.parent.finished():
                self.parents.pop(child.parent.request_id, None)
            if request_output is not None:
                results.append(request_output)
        return results, to_abort

    def _update_metrics(self, parent: ParentState, now: float, out: EngineCoreOutput) -> None:
        m = parent.metrics
        if out.new_token_ids and m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        parent.num_cached_tokens = out.num_cached_tokens
        if parent.finished():
            m.finished_time = now

    def _update_child(self, child: ChildState, out: EngineCoreOutput) -> bool:
        params = child.parent.params
        if out.new_prompt_logprobs is not None and child.index == 0:
            parent = child.parent
            if parent.prompt_logprobs is None:
                parent.prompt_logprobs = [None]
            parent.prompt_logprobs.extend(self._logprob_dict(r) for r in out.new_prompt_logprobs)
        child.token_ids.extend(out.new_token_ids)
        if out.new_logprobs and child.logprobs is not None:
            for row in out.new_logprobs:
                child.logprobs.append(self._logprob_dict(row))
                child.cumulative_logprob += row[1][0]
        if out.finish_reason is not None:
            child.finish(out.finish_reason, out.stop_reason)
        if child.detok is None:
            return False
        if child.detok.defer:  # final-only, no stop strings: the text is made at the end
            child.detok.add_tokens(out.new_token_ids)
            if out.finish_reason is not None:
                child.text_so_far()
            return False
        new_text = child.detok.add_tokens(out.new_token_ids)
        if out.finish_reason is not None:
            new_text += child.detok.flush()
        child.text += new_text
        if params.stop and len(child.token_ids) > params.min_tokens:
            hit = find_stop_string(child.text, len(new_text), params.stop,
                                   params.include_stop_str_in_output)
            if hit is not None:
                child.text = child.text[:hit[1]]
                child.finish("stop", hit[0])
                return True
        return False

    def _logprob_dict(self, row: LogprobsRow) -> dict[int, Logprob]:
        ids, lps, ranks = row
        result = {}
        for token_id, lp, rank in zip(ids, lps, ranks):
            if token_id not in result:
                result[token_id] = Logprob(lp, rank, self._decode_one(token_id))
        return result

    def _decode_one(self, token_id: int) -> Optional[str]:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id])

    def _make_output(self, child: ChildState) -> Optional[RequestOutput]:
        parent = child.parent
        kind = parent.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not parent.finished():
            return None
        if kind == RequestOutputKind.DELTA:
            completions = [self._completion(child, delta=True)]
        else:
            completions = [self._completion(c, delta=False)
                           for _, c in sorted(parent.children.items())]
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids,
                             parent.prompt_logprobs, completions, parent.finished(),
                             parent.num_cached_tokens, parent.metrics)

    def _completion(self, child: ChildState, delta: bool) -> CompletionOutput:
        finished = child.finish_reason is not None
        hold = 0 if finished else withheld_chars(child.parent.params)
        visible = max(child.sent_text, len(child.text) - hold)
        text, token_ids, logprobs = child.text[:visible], child.token_ids, child.logprobs
        if delta:
            text = text[child.sent_text:]
            token_ids = token_ids[child.sent_tokens:]
            logprobs = logprobs[child.sent_tokens:] if logprobs is not None else None
            child.sent_text, child.sent_tokens = visible, len(child.token_ids)
        return CompletionOutput(child.index, text, list(token_ids), child.cumulative_logprob,
                                list(logprobs) if logprobs is not None else None,
                                child.finish_reason, child.stop_reason)
