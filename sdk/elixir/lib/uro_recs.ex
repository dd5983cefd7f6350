defmodule UroRecs do
  @moduledoc """
  The Elixir client of uro-recs, the recommendation sidecar.

  Add a pool of connections to the supervision tree, then call it by name from anywhere:

      # config/runtime.exs
      config :uro_recs, endpoint: "ipc:///run/uro-recs/client.sock", model: "als", pool_size: 2

      # application.ex
      children = [UroRecs, ...]          # or {UroRecs, name: MyRecs, model: "als", ...}

      {:ok, %UroRecs.Recommendation{items: items}} = UroRecs.recommend(UroRecs, user_id, n: 20)

  Every call returns `{:ok, result}` or `{:error, %UroRecs.Error{}}`; the client has already
  retried retryable errors within the call's `timeout` (see `UroRecs.Client` for budgets,
  retries, reconnects and bounds, and `UroRecs.Error` for the codes). Arguments that can never
  work (a non-integer timeout, no model) raise `ArgumentError`.

  Options of every call: `:timeout` (ms, the call's whole budget, default the pool's
  `timeout`, 1000) and, for ops on a model, `:model` (default the pool's `model`).

  The pieces: `UroRecs.Client` (one connection process), `UroRecs.Msgpack` and
  `UroRecs.ZMTP` (the codec and the framing, pure modules), `UroRecs.Telemetry` (events).
  The wire is docs/PROTOCOL.md in the repository.
  """

  alias UroRecs.{Client, Error, Pool, Results, Telemetry}

  @typedoc "A user or item id: a string (uro's UUIDs) or a signed 64-bit integer."
  @type id :: binary() | integer()
  @typedoc "A pool's name (the `:name` given to `child_spec/1`, default `UroRecs`)."
  @type client :: atom()
  @type result(t) :: {:ok, t} | {:error, Error.t()}

  @max_events_per_request 1_000

  @doc """
  A child spec for a pool of `pool_size` connections (default 1) registered as `name`
  (default `UroRecs`). Options are `:name`, `:pool_size` and those of `UroRecs.Client`;
  application config (`config :uro_recs, ...`) supplies defaults for all of them.
  """
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts \\ []) do
    opts = Keyword.merge(Application.get_all_env(:uro_recs), opts)
    name = Keyword.get(opts, :name, UroRecs)
    %{id: {UroRecs, name}, start: {Pool, :start_link, [opts]}, type: :supervisor}
  end

  @doc "Starts a pool outside a supervision tree (tests, scripts); see `child_spec/1`."
  @spec start_link(keyword()) :: Supervisor.on_start()
  def start_link(opts \\ []), do: Pool.start_link(opts)

  @doc """
  Recommendations for one user (`{:ok, %UroRecs.Recommendation{}}`) or for a list of users
  (`{:ok, [%UroRecs.Recommendation{}]}`, in the order asked; at most 1000 users).

  Options: `:n` (10), `:filter_consumed` (true), `:exclude` (item ids never to return, `[]`),
  `:seq` (sequence models, one user only: the user's most recent item ids, oldest first),
  `:model`, `:timeout`.
  """
  @spec recommend(client(), id() | [id()], keyword()) ::
          result(UroRecs.Recommendation.t() | [UroRecs.Recommendation.t()])
  def recommend(client, user_or_users, opts \\ []) do
    opts =
      Keyword.validate!(opts, [:model, :timeout, :seq, n: 10, filter_consumed: true, exclude: []])

    args =
      [
        {"n", opts[:n]},
        {"filter_consumed", opts[:filter_consumed]}
        | if(opts[:exclude] == [], do: [], else: [{"exclude", opts[:exclude]}])
      ] ++ if(opts[:seq] == nil, do: [], else: [{"seq", opts[:seq]}])

    if is_list(user_or_users) do
      args = [{"users", user_or_users} | args]
      call(client, :recommend, :recommend_many, args, user_or_users, opts)
    else
      call(client, :recommend, :recommend, [{"user", user_or_users} | args], nil, opts)
    end
  end

  @doc """
  Scores of `items` (1..10000 item ids) for `user`: `{:ok, %UroRecs.Prediction{}}`.
  Options: `:model`, `:timeout`.
  """
  @spec predict(client(), id(), [id()], keyword()) :: result(UroRecs.Prediction.t())
  def predict(client, user, items, opts \\ []) when is_list(items) do
    opts = Keyword.validate!(opts, [:model, :timeout])
    call(client, :predict, :predict, [{"user", user}, {"items", items}], items, opts)
  end

  @doc """
  The `n` items most similar to `item`: `{:ok, %UroRecs.SimilarItems{}}`.
  Options: `:n` (10), `:model`, `:timeout`.
  """
  @spec similar_items(client(), id(), keyword()) :: result(UroRecs.SimilarItems.t())
  def similar_items(client, item, opts \\ []) do
    opts = Keyword.validate!(opts, [:model, :timeout, n: 10])
    call(client, :similar_items, :similar_items, [{"item", item}, {"n", opts[:n]}], nil, opts)
  end

  @doc """
  Appends interaction events to the event log: `{:ok, accepted}`, the number of events stored
  (new or already there).

  Each event is a map with `:user_id` and `:item_id` (UUID strings), `:item_kind`
  (`"avatar"`, `"map"` or `"prop"`), `:event` (`"play"`, `"view"`, ...), `:occurred_at` (a
  `DateTime`) or `:occurred_at_us` (integer microseconds since the Unix epoch), and an
  optional `:weight` (number, default 1.0). String keys work too.

  More than 1000 events go as several requests, one after the other, within the one
  `:timeout`; on an error the events of earlier requests are stored and sending them all again
  is safe (an event is stored once, whatever the number of sends).
  """
  @spec ingest(client(), [map()], keyword()) :: result(non_neg_integer())
  def ingest(client, events, opts \\ []) when is_list(events) do
    opts = Keyword.validate!(opts, [:timeout])
    deadline = deadline(client, opts)

    events
    |> Enum.map(&wire_event/1)
    |> Enum.chunk_every(@max_events_per_request)
    |> case do
      [] -> [[]]
      chunks -> chunks
    end
    |> Enum.reduce_while({:ok, 0}, fn chunk, {:ok, accepted} ->
      opts = [timeout: max(deadline - now(), 1)]

      case call(client, :ingest, :ingest, [{"events", chunk}], nil, opts) do
        {:ok, count} -> {:cont, {:ok, accepted + count}}
        error -> {:halt, error}
      end
    end)
  end

  @doc "The model versions served now: `{:ok, [%UroRecs.ModelInfo{}]}`. Option: `:timeout`."
  @spec info(client(), keyword()) :: result([UroRecs.ModelInfo.t()])
  def info(client, opts \\ []) do
    opts = Keyword.validate!(opts, [:timeout])
    call(client, :info, :info, [], nil, opts)
  end

  @doc """
  The broker's counters and per-model state, as the map it sends (docs/PROTOCOL.md, `stats`).
  Option: `:timeout`.
  """
  @spec stats(client(), keyword()) :: result(map())
  def stats(client, opts \\ []) do
    opts = Keyword.validate!(opts, [:timeout])
    call(client, :stats, :stats, [], nil, opts)
  end

  @doc """
  Any op, by its wire name, with `args` as a map: `{:ok, result_map}`. For ops this client has
  no function for yet. Options: `:model` (sent only when given), `:timeout`.
  """
  @spec request(client(), binary(), map(), keyword()) :: result(map())
  def request(client, op, args, opts \\ []) when is_binary(op) and is_map(args) do
    opts = Keyword.validate!(opts, [:model, :timeout])
    call(client, op, :raw, Map.to_list(args), nil, opts)
  end

  ## Calls

  @model_ops [:recommend, :predict, :similar_items]

  defp call(client, op, kind, args, asked, opts) do
    {connection, config} = Pool.checkout(client)
    default_model = if op in @model_ops, do: config.model
    metadata = %{client: client, op: op, model: Keyword.get(opts, :model, default_model)}

    Telemetry.span(metadata, fn ->
      timeout = Client.check_timeout!(Keyword.get(opts, :timeout, config.timeout))
      model = model(op, opts, config)
      deadline = now() + timeout

      with {:ok, entries, count} <- encode(config.codec, op, model, args),
           {:ok, result} <- Client.request(connection, entries, count, deadline) do
        Results.parse(kind, result, asked)
      end
    end)
  end

  defp model(op, opts, config) when op in @model_ops do
    case Keyword.get(opts, :model, config.model) do
      model when is_binary(model) ->
        model

      nil ->
        raise ArgumentError, "no :model given and the pool has no default model (config :model)"

      other ->
        raise ArgumentError, "model must be a string, got #{inspect(other)}"
    end
  end

  defp model(_op, opts, _config), do: Keyword.get(opts, :model)

  # The body's map entries other than `id` and `timeout_ms`, which the connection adds.
  defp encode(codec, op, model, args) do
    pairs = [{"v", 1}, {"op", op}, {"args", Map.new(args)}]
    pairs = if model, do: [{"model", model} | pairs], else: pairs

    encoded =
      Enum.reduce_while(pairs, [], fn {key, value}, acc ->
        with {:ok, key} <- codec.encode(key),
             {:ok, value} <- codec.encode(value) do
          {:cont, [acc, key, value]}
        else
          {:error, reason} -> {:halt, {:error, reason}}
        end
      end)

    case encoded do
      {:error, reason} ->
        {:error, Error.new(:bad_request, "cannot encode the request: #{inspect(reason)}")}

      entries ->
        {:ok, entries, length(pairs)}
    end
  end

  defp deadline(client, opts) do
    config = Pool.config(client)
    now() + Client.check_timeout!(Keyword.get(opts, :timeout, config.timeout))
  end

  defp wire_event(event) when is_map(event) do
    fetch = fn key -> Map.get(event, key, Map.get(event, Atom.to_string(key))) end

    occurred_at_us =
      case fetch.(:occurred_at) do
        %DateTime{} = at -> DateTime.to_unix(at, :microsecond)
        nil -> fetch.(:occurred_at_us)
        other -> raise ArgumentError, "occurred_at must be a DateTime, got #{inspect(other)}"
      end

    wire = [
      {"user_id", fetch.(:user_id)},
      {"item_kind", fetch.(:item_kind)},
      {"item_id", fetch.(:item_id)},
      {"event", fetch.(:event)},
      {"occurred_at_us", occurred_at_us}
    ]

    case fetch.(:weight) do
      nil -> Map.new(wire)
      weight -> Map.new([{"weight", weight} | wire])
    end
  end

  defp wire_event(other),
    do: raise(ArgumentError, "an event must be a map, got #{inspect(other)}")

  defp now, do: System.monotonic_time(:millisecond)
end
