defmodule UroRecs.Recommendation do
  @moduledoc "The items for one user, best first; `cold_start` when the model does not know the user."
  @enforce_keys [:user, :items, :cold_start]
  defstruct [:user, :items, :cold_start]
  @type t :: %__MODULE__{user: UroRecs.id(), items: [UroRecs.id()], cold_start: boolean()}
end

defmodule UroRecs.Prediction do
  @moduledoc "One score per item asked, in order; `nil` for an item the model does not know."
  @enforce_keys [:user, :scores, :cold_start]
  defstruct [:user, :scores, :cold_start]
  @type t :: %__MODULE__{user: UroRecs.id(), scores: [float() | nil], cold_start: boolean()}
end

defmodule UroRecs.SimilarItems do
  @moduledoc "The items most like `item`, best first, with their cosine similarities."
  @enforce_keys [:item, :items, :scores, :cold_start]
  defstruct [:item, :items, :scores, :cold_start]

  @type t :: %__MODULE__{
          item: UroRecs.id(),
          items: [UroRecs.id()],
          scores: [float()],
          cold_start: boolean()
        }
end

defmodule UroRecs.ModelInfo do
  @moduledoc "One served model version, from `info`: `class` is the LibRecommender class."
  @enforce_keys [:name, :version, :workers, :class, :n_users, :n_items, :ops]
  defstruct [:name, :version, :workers, :class, :n_users, :n_items, :ops]

  @type t :: %__MODULE__{
          name: binary(),
          version: binary(),
          workers: non_neg_integer(),
          class: binary(),
          n_users: non_neg_integer(),
          n_items: non_neg_integer(),
          ops: [binary()]
        }
end

defmodule UroRecs.Results do
  @moduledoc false
  # Reply `result` maps -> structs. A result that breaks the contract is an :internal error,
  # never a crash in the caller.

  alias UroRecs.{Error, ModelInfo, Prediction, Recommendation, SimilarItems}

  @spec parse(atom(), term(), term()) :: {:ok, term()} | {:error, Error.t()}
  def parse(kind, result, asked \\ nil) do
    {:ok, do_parse(kind, result, asked)}
  catch
    {:malformed, what} -> {:error, Error.new(:internal, "malformed result: #{what}")}
  end

  defp do_parse(:recommend, result, _), do: recommendation(result)

  defp do_parse(:recommend_many, result, asked) do
    recs = Enum.map(list(result, "results"), &recommendation/1)

    if length(recs) != length(asked),
      do: throw({:malformed, "asked for #{length(asked)} users, got #{length(recs)} results"})

    recs
  end

  defp do_parse(:predict, result, asked) do
    scores = Enum.map(list(result, "scores"), &score_or_nil/1)

    if length(scores) != length(asked),
      do: throw({:malformed, "asked for #{length(asked)} scores, got #{length(scores)}"})

    %Prediction{user: id(result, "user"), scores: scores, cold_start: bool(result, "cold_start")}
  end

  defp do_parse(:similar_items, result, _) do
    items = ids(result, "items")
    scores = Enum.map(list(result, "scores"), &score/1)

    if length(items) != length(scores),
      do: throw({:malformed, "items and scores differ in length"})

    %SimilarItems{
      item: id(result, "item"),
      items: items,
      scores: scores,
      cold_start: bool(result, "cold_start")
    }
  end

  defp do_parse(:info, result, _) do
    for model <- list(result, "models") do
      ops = list(model, "ops")
      unless Enum.all?(ops, &is_binary/1), do: throw({:malformed, "ops is not a list of strings"})

      %ModelInfo{
        name: string(model, "name"),
        version: string(model, "version"),
        workers: integer(model, "workers"),
        class: string(model, "class"),
        n_users: integer(model, "n_users"),
        n_items: integer(model, "n_items"),
        ops: ops
      }
    end
  end

  defp do_parse(:stats, result, _) do
    for key <- ["uptime_s", "draining", "models", "counters"], do: field(result, key)
    result
  end

  defp do_parse(:ingest, result, _), do: integer(result, "accepted")

  defp do_parse(:raw, result, _), do: result

  defp recommendation(result) do
    %Recommendation{
      user: id(result, "user"),
      items: ids(result, "items"),
      cold_start: bool(result, "cold_start")
    }
  end

  defp field(map, key) when is_map(map) do
    case map do
      %{^key => value} -> value
      _ -> throw({:malformed, "missing #{inspect(key)}"})
    end
  end

  defp field(_, key), do: throw({:malformed, "not a map where #{inspect(key)} belongs"})

  defp list(map, key) do
    case field(map, key) do
      value when is_list(value) -> value
      _ -> throw({:malformed, "#{inspect(key)} is not a list"})
    end
  end

  defp id(map, key), do: check_id(field(map, key), key)
  defp ids(map, key), do: Enum.map(list(map, key), &check_id(&1, key))

  defp check_id(value, _key) when is_binary(value) or is_integer(value), do: value

  defp check_id(_, key),
    do: throw({:malformed, "#{inspect(key)} holds a value that is not an id"})

  defp bool(map, key) do
    case field(map, key) do
      value when is_boolean(value) -> value
      _ -> throw({:malformed, "#{inspect(key)} is not a boolean"})
    end
  end

  defp integer(map, key) do
    case field(map, key) do
      value when is_integer(value) -> value
      _ -> throw({:malformed, "#{inspect(key)} is not an integer"})
    end
  end

  defp string(map, key) do
    case field(map, key) do
      value when is_binary(value) -> value
      _ -> throw({:malformed, "#{inspect(key)} is not a string"})
    end
  end

  defp score(value) when is_float(value), do: value
  defp score(value) when is_integer(value), do: value * 1.0
  defp score(value), do: throw({:malformed, "score #{inspect(value, limit: 3)} is not a number"})

  defp score_or_nil(nil), do: nil
  defp score_or_nil(value), do: score(value)
end
