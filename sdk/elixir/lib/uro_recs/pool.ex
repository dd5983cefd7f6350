defmodule UroRecs.Pool do
  @moduledoc false
  # `pool_size` UroRecs.Client processes behind one name. The name maps (in :persistent_term,
  # written once at start) to the connections' registered names, a round-robin counter and the
  # client configuration the callers need to build requests.

  use Supervisor

  alias UroRecs.Client

  @pool_keys [:name, :pool_size]

  @spec start_link(keyword()) :: Supervisor.on_start()
  def start_link(opts) do
    opts = Keyword.merge(Application.get_all_env(:uro_recs), opts)
    name = Keyword.get(opts, :name, UroRecs)
    Supervisor.start_link(__MODULE__, opts, name: Module.concat(name, Supervisor))
  end

  @impl true
  def init(opts) do
    name = Keyword.get(opts, :name, UroRecs)
    size = Keyword.get(opts, :pool_size, 1)

    unless is_atom(name), do: raise(ArgumentError, "name must be an atom, got #{inspect(name)}")

    unless is_integer(size) and size in 1..256,
      do: raise(ArgumentError, "pool_size must be an integer in 1..256, got #{inspect(size)}")

    client_opts = Keyword.drop(opts, @pool_keys)
    config = Client.config(client_opts)
    connections = for i <- 1..size, do: Module.concat(name, "Connection#{i}")
    # Loads :telemetry if the host has it, so UroRecs.Telemetry sees it.
    Code.ensure_loaded(:telemetry)

    :persistent_term.put({__MODULE__, name}, %{
      connections: List.to_tuple(connections),
      counter: :atomics.new(1, signed: false),
      config: Map.take(config, [:model, :timeout, :codec])
    })

    children =
      for conn <- connections do
        Supervisor.child_spec({Client, [{:name, conn} | client_opts]}, id: conn)
      end

    Supervisor.init(children, strategy: :one_for_one, max_restarts: 10, max_seconds: 5)
  end

  @doc "One connection of the pool (round robin) and the pool's client configuration."
  @spec checkout(atom()) :: {atom(), map()}
  def checkout(name) do
    %{connections: connections, counter: counter, config: config} = entry!(name)
    index = rem(:atomics.add_get(counter, 1, 1), tuple_size(connections))
    {elem(connections, index), config}
  end

  @doc "The pool's client configuration, without taking a turn of the round robin."
  @spec config(atom()) :: map()
  def config(name), do: entry!(name).config

  defp entry!(name) do
    case :persistent_term.get({__MODULE__, name}, nil) do
      nil ->
        raise ArgumentError,
              "no UroRecs pool named #{inspect(name)}: add {UroRecs, name: #{inspect(name)}} " <>
                "to your supervision tree"

      entry ->
        entry
    end
  end

  @doc "The pool's connections."
  @spec connections(atom()) :: [atom()]
  def connections(name) do
    %{connections: connections} = :persistent_term.get({__MODULE__, name})
    Tuple.to_list(connections)
  end
end
