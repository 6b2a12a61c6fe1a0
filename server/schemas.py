"""The HTTP contract: what HELM's ``neurips/local`` client and the starter kit send and read.

Both request vocabularies are accepted: HELM's (``num_return_sequences``, ``top_k_per_token``,
``stop_sequences``, ``top_p``, ``echo_prompt``) and the starter kit's (``num_samples``, ``top_k``,
``seed``). Out-of-range values are answered with 422 naming the field. Unknown fields are ignored,
so a newer client never breaks the eval.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_SEQUENCES = 16  # num_return_sequences / num_samples upper bound
MAX_TOP_LOGPROBS = 50  # top_k_per_token upper bound
GREEDY_TEMPERATURE = 1e-5  # at or below this, decoding is greedy (HELM sends 1e-7 for 0)


def _unicode(text: str) -> str:
    """JSON allows lone surrogates (``"\\ud800"``); Unicode text, and so the tokenizer, does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), which is not Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class ProcessRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # echo_prompt comes before prompt so that prompt's validator can see it.
    echo_prompt: bool = Field(False, description="return the prompt's tokens and logprobs before the generated ones")
    prompt: Text
    max_new_tokens: int = Field(50, ge=0, description="0 with echo_prompt scores the prompt only")
    temperature: float = Field(0.8, ge=0.0, description=f"<= {GREEDY_TEMPERATURE} means greedy")
    top_k: int = Field(200, ge=0, description="sample from the k most likely tokens; 0 disables")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    num_samples: int = Field(1, ge=1, le=MAX_SEQUENCES, description="starter kit's name for num_return_sequences")
    num_return_sequences: int | None = Field(None, ge=1, le=MAX_SEQUENCES, description="HELM's name; wins over num_samples")
    # The range torch.Generator.manual_seed takes; outside it sampling would fail with a 500.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="makes sampling for this request deterministic")
    top_k_per_token: int = Field(1, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token in top_logprob")
    stop_sequences: list[Text] = Field(default_factory=list, description="generation stops and is cut before any of these")

    @field_validator("prompt")
    @classmethod
    def _prompt_needed(cls, prompt: str, info: ValidationInfo) -> str:
        if not prompt and not info.data.get("echo_prompt", False):
            raise ValueError("must not be empty unless echo_prompt is true")
        return prompt

    @field_validator("stop_sequences")
    @classmethod
    def _no_empty_stop(cls, stops: list[str]) -> list[str]:
        if any(s == "" for s in stops):
            raise ValueError("empty strings are not allowed")
        return stops

    @property
    def n(self) -> int:
        return self.num_return_sequences if self.num_return_sequences is not None else self.num_samples

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE


class Token(BaseModel):
    text: str
    logprob: float
    top_logprob: dict[str, float]


class Completion(BaseModel):
    text: str
    tokens: list[Token]
    logprob: float


class ProcessResponse(BaseModel):
    text: str
    tokens: list[Token]
    logprob: float
    request_time: float
    completions: list[Completion] = Field(description="every returned sequence; the top-level fields repeat the first")
    truncated_prompt_tokens: int = Field(0, description="prompt tokens dropped from the left to fit the context")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: Text
    truncation: bool = Field(True, description="keep only the first max_length tokens (BOS included)")
    max_length: int = Field(2048, ge=1)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    request_time: float


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int]


class DecodeResponse(BaseModel):
    text: str
    request_time: float
