"""Request and response bodies of the OpenAI-compatible API (pydantic).

Field names, defaults and ranges follow OpenAI's API reference, so the official clients work
unchanged; the range checks live here, in one table per request, and a violation becomes a
400 naming the parameter. A sampling option left out keeps Muse's own default
(`muse.SamplingParams`), not OpenAI's. Extensions that vLLM and mlx-lm also accept: `top_k`,
`min_p`, `repetition_penalty`; and Muse's own `loop_guard`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 16  # n: choices per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOPS = 16
MAX_EMBED_INPUTS = 2048  # OpenAI's own limit

NonEmpty = Annotated[str, Field(min_length=1)]


class _Request(BaseModel):
    # Unknown fields are ignored (clients send many: user, metadata, store, ...); fields that
    # would change the result but are not supported are declared and rejected explicitly.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(_Request):
    """The sampling options chat and completions share."""

    model: str = Field(description="A model id from GET /v1/models.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Most tokens to generate.")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0, description="Muse extension: sample from the k most likely tokens.")
    min_p: Optional[float] = Field(None, ge=0.0, lt=1.0, description="Muse extension.")
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=10.0, description="Muse extension.")
    loop_guard: Optional[bool] = Field(None, description="Muse extension: stop when the output starts repeating "
                                                         "itself word for word (default true).")
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stop: Union[NonEmpty, list[NonEmpty], None] = Field(None, max_length=MAX_STOPS)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate for each prompt.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Union[bool, int]] = Field(None, description="Not supported: must be left out or false.")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart]]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="Newer name for max_tokens.")
    tools: Optional[list[dict]] = Field(None, description="Not supported: must be left out or empty.")


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    echo: bool = False
    suffix: Optional[str] = Field(None, description="Not supported: must be left out.")
    best_of: Optional[int] = Field(None, ge=1, le=1, description="Only 1 is supported.")


class EmbeddingRequest(_Request):
    model: str
    input: Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1, description="Must equal the model's size if given.")


# -- responses ------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens whose keys and values came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "muse"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
