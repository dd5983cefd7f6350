defmodule UroRecs.Error do
  @moduledoc """
  Why a call failed: `code` is one of the protocol's error codes (docs/PROTOCOL.md section 4),
  `message` says what happened, `retry?` whether sending the same request again may succeed.

  By the time a call returns a retryable error the client has already retried it within the
  call's timeout, so the caller's next step is a fallback (cached or popular items), not a
  loop.

  | code | retry? | from |
  |---|---|---|
  | `:bad_request` | false | the broker refused the request, or the client could not encode it |
  | `:too_large` | false | the request asks for too much (split `users`) |
  | `:unsupported_version` | false | the broker does not speak the request's protocol version |
  | `:unknown_op` | false | no such operation |
  | `:unknown_model` | false | no model of that name is served |
  | `:unsupported` | false | the model cannot do this op (`similar_items` on DeepFM) |
  | `:deadline_exceeded` | false | no answer within the call's `timeout` |
  | `:overloaded` | true | the model's queue is full, or this connection has `max_in_flight` requests out |
  | `:unavailable` | true | no live worker, the broker is draining, or the client is not connected |
  | `:worker_lost` | true | the worker died holding the request |
  | `:internal` | false | a server bug, or a reply that breaks the protocol |

  An error code this client does not know (from a newer broker) becomes `:internal`, with the
  code in the message and the broker's `retry` flag kept.
  """

  @type code ::
          :bad_request
          | :too_large
          | :unsupported_version
          | :unknown_op
          | :unknown_model
          | :unsupported
          | :deadline_exceeded
          | :overloaded
          | :unavailable
          | :worker_lost
          | :internal

  @type t :: %__MODULE__{code: code(), message: binary(), retry?: boolean()}

  defexception code: :internal, message: "", retry?: false

  @codes %{
    "bad_request" => :bad_request,
    "too_large" => :too_large,
    "unsupported_version" => :unsupported_version,
    "unknown_op" => :unknown_op,
    "unknown_model" => :unknown_model,
    "unsupported" => :unsupported,
    "deadline_exceeded" => :deadline_exceeded,
    "overloaded" => :overloaded,
    "unavailable" => :unavailable,
    "worker_lost" => :worker_lost,
    "internal" => :internal
  }
  @retryable [:overloaded, :unavailable, :worker_lost]

  @doc "Every code of the contract, as atoms."
  @spec codes() :: [code()]
  def codes, do: Map.values(@codes)

  @doc "An error the client itself decided on (not connected, timed out, could not encode)."
  @spec new(code(), binary()) :: t()
  def new(code, message) when is_atom(code) and is_binary(message),
    do: %__MODULE__{code: code, message: message, retry?: code in @retryable}

  @doc """
  The error of a reply's `error` map (`%{"code" => str, "message" => str, "retry" => bool}`).

      iex> UroRecs.Error.from_wire(%{"code" => "overloaded", "message" => "queue full", "retry" => true})
      %UroRecs.Error{code: :overloaded, message: "queue full", retry?: true}
  """
  @spec from_wire(term()) :: t()
  def from_wire(%{"code" => code, "message" => message} = error)
      when is_binary(code) and is_binary(message) do
    retry = Map.get(error, "retry")

    case Map.fetch(@codes, code) do
      {:ok, atom} when is_boolean(retry) ->
        %__MODULE__{code: atom, message: message, retry?: retry}

      {:ok, atom} ->
        new(atom, message)

      :error ->
        %__MODULE__{code: :internal, message: "#{code}: #{message}", retry?: retry == true}
    end
  end

  def from_wire(other),
    do:
      new(:internal, "malformed error in reply: #{inspect(other, limit: 5, printable_limit: 80)}")

  @impl true
  def message(%__MODULE__{code: code, message: message}), do: "#{code}: #{message}"
end
