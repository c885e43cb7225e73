"""Request and response bodies of the OpenAI-compatible API (pydantic).

Field names, defaults and ranges follow OpenAI's API reference, so the official clients work
unchanged; a violation becomes a 400 naming the parameter. The bounds of every sampling
option come from `muse.sampling.RANGES`, the table `SamplingParams` checks against. A sampling option left out keeps Muse's own default
(`muse.SamplingParams`), not OpenAI's. Extensions that vLLM and mlx-lm also accept: `top_k`,
`min_p`, `repetition_penalty`, `response_format` on /v1/completions; and Muse's own `loop_guard`.

Fields that would change the output but are not supported (audio, prediction, web search,
the deprecated functions) are declared, so they are documented and answered with a 400 naming
them, never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from muse.sampling import LOGIT_BIAS, RANGES

MAX_CHOICES = 16  # n: choices per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOPS = 16
MAX_EMBED_INPUTS = 2048  # OpenAI's own limit
MAX_TOOLS = 128  # OpenAI's own limit
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions (OpenAI's limit)

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
    max_tokens: Optional[int] = Field(None, **RANGES["max_new_tokens"].bounds(), description="Most tokens to generate.")
    temperature: Optional[float] = Field(None, **RANGES["temperature"].bounds(), description="0 = greedy.")
    top_p: Optional[float] = Field(None, **RANGES["top_p"].bounds())
    top_k: Optional[int] = Field(None, **RANGES["top_k"].bounds(), description="Muse extension: sample from the k most likely tokens.")
    min_p: Optional[float] = Field(None, **RANGES["min_p"].bounds(), description="Muse extension.")
    repetition_penalty: Optional[float] = Field(None, **RANGES["repetition_penalty"].bounds(), description="Muse extension.")
    loop_guard: Optional[bool] = Field(None, description="Muse extension: stop when the output starts repeating "
                                                         "itself word for word (default true).")
    presence_penalty: Optional[float] = Field(None, **RANGES["presence_penalty"].bounds())
    frequency_penalty: Optional[float] = Field(None, **RANGES["frequency_penalty"].bounds())
    seed: Optional[int] = Field(None, **RANGES["seed"].bounds())
    stop: Union[NonEmpty, list[NonEmpty], None] = Field(None, max_length=MAX_STOPS)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate for each prompt.")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, Annotated[float, Field(**LOGIT_BIAS.bounds())]]] = Field(
        None, description="Token id (as a string) → a bias in [-100, 100] added to its logit; ±100 bans or forces it.")
    response_format: Optional["ResponseFormat"] = Field(
        None, description="text, json_object (any JSON object) or json_schema (output valid under the schema; "
                          "strict: objects without additionalProperties allow no other properties).")


class JSONSchemaFormat(BaseModel):
    name: str = Field("response", min_length=1, max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class TextFormat(BaseModel):
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[Union[TextFormat, JSONObjectFormat, JSONSchemaResponseFormat], Field(discriminator="type")]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = Field(None, description="Null only on an assistant message "
                                                                         "with tool_calls.")
    tool_calls: Optional[list[ToolCall]] = Field(None, description="On an assistant message: the calls it made.")
    tool_call_id: Optional[str] = Field(None, description="On a tool message: the call it answers.")
    name: Optional[str] = None


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="A JSON schema of the arguments.")
    strict: Optional[bool] = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, **RANGES["max_new_tokens"].bounds(), description="Newer name for max_tokens.")
    logprobs: Optional[bool] = Field(None, description="Return each output token's log-probability.")
    top_logprobs: Optional[int] = Field(None, **RANGES["logprobs"].bounds(),
                                        description="With logprobs: the most likely tokens at each position.")
    tools: Optional[list[ToolDefinition]] = Field(None, max_length=MAX_TOOLS,
                                                  description="Functions the model may call (Hermes <tool_call> "
                                                              "format; arguments always match their schema).")
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = Field(None, description="Allow several calls in one reply (default true).")
    # not supported: answered with a 400 naming the field
    functions: Optional[Any] = Field(None, description="Not supported (deprecated): use tools.")
    function_call: Optional[Any] = Field(None, description="Not supported (deprecated): use tool_choice.")
    audio: Optional[Any] = Field(None, description="Not supported: text only.")
    modalities: Optional[list[str]] = Field(None, description='Only ["text"].')
    prediction: Optional[Any] = Field(None, description="Not supported (predicted outputs).")
    web_search_options: Optional[Any] = Field(None, description="Not supported: no web search.")


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS,
                                    description="Return each output token's log-probability and this many most "
                                                "likely tokens at each position.")
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
    content: Optional[str] = Field(description="Null when the reply is only tool calls.")
    tool_calls: Optional[list[ToolCall]] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = Field(description="The token's UTF-8 bytes (a token may hold part of a character).")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Optional[Literal["stop", "length", "tool_calls"]]
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: Optional[list[Optional[dict[str, float]]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[Literal["stop", "length"]]
    logprobs: Optional[CompletionLogprobs] = None


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


class ResponsesRequest(_Request):
    """POST /v1/responses: text in (a string, or message, function_call and function_call_output
    items), text or function calls out. Nothing is stored: previous_response_id is not supported."""

    model: str = Field(description="A model id from GET /v1/models.")
    input: Union[str, Annotated[list[dict[str, Any]], Field(min_length=1)]]
    instructions: Optional[str] = Field(None, description="A system message put before the input.")
    max_output_tokens: Optional[int] = Field(None, **RANGES["max_new_tokens"].bounds())
    temperature: Optional[float] = Field(None, **RANGES["temperature"].bounds())
    top_p: Optional[float] = Field(None, **RANGES["top_p"].bounds())
    seed: Optional[int] = Field(None, **RANGES["seed"].bounds(), description="Muse extension.")
    loop_guard: Optional[bool] = Field(None, description="Muse extension (default true).")
    tools: Optional[list[dict[str, Any]]] = Field(None, max_length=MAX_TOOLS,
                                                  description="Function tools: {type, name, description, parameters}.")
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[dict[str, Any]] = Field(None, description="{format: {type: text | json_object | json_schema}}.")
    stream: bool = False
    # not supported: answered with a 400 naming the field
    previous_response_id: Optional[str] = Field(None, description="Not supported: nothing is stored.")
    conversation: Optional[Any] = Field(None, description="Not supported: nothing is stored.")
    background: Optional[bool] = Field(None, description="Not supported.")
    prompt: Optional[Any] = Field(None, description="Not supported (stored prompt templates).")
    include: Optional[list[str]] = Field(None, description="Not supported: must be empty.")
    top_logprobs: Optional[int] = Field(None, description="Not supported on /v1/responses.")
    truncation: Optional[Literal["auto", "disabled"]] = Field(None, description='Only "disabled".')


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or messages rendered by the chat template."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    add_special_tokens: Optional[bool] = Field(None, description="Default: true for a prompt, false for messages.")
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


SamplingFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
