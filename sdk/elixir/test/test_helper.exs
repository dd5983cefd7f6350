# Tests tagged :live talk to a running broker; they run only when URO_RECS_BROKER_IPC names
# its client.sock. Tests tagged :integration start the sidecar through its Python CLI; they
# run only when URO_RECS_PYTHON names the project's Python. `make test-elixir` sets both.
unset? = fn name -> System.get_env(name) in [nil, ""] end

exclude =
  Enum.filter([live: "URO_RECS_BROKER_IPC", integration: "URO_RECS_PYTHON"], fn {_, var} ->
    unset?.(var)
  end)
  |> Keyword.keys()

ExUnit.start(exclude: exclude)
