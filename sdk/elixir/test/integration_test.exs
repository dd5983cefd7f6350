defmodule UroRecs.IntegrationTest do
  # The client against the real sidecar: models trained, broker and workers started, killed
  # and restarted through the Python CLI (UroRecs.TestCluster). Runs when URO_RECS_PYTHON
  # names the project's Python (`make test-elixir` sets it).
  use ExUnit.Case, async: false

  alias UroRecs.{Error, Msgpack, Recommendation, TestCluster, ZMTP}

  @moduletag :integration
  @moduletag timeout: 300_000

  @models %{"als" => "als", "spare" => "als", "deepfm" => "deepfm", "rnn4rec" => "rnn4rec"}
  @workers %{"als" => 2, "spare" => 1, "deepfm" => 1, "rnn4rec" => 1}

  setup_all do
    cluster = TestCluster.start(@models, @workers)
    # Shared state for the tests that replace killed processes.
    {:ok, agent} = Agent.start(fn -> cluster end)
    on_exit(fn -> TestCluster.stop(Agent.get(agent, & &1)) end)
    %{agent: agent}
  end

  setup %{agent: agent} do
    cluster = Agent.get(agent, & &1)
    name = :"it_#{System.unique_integer([:positive])}"

    start_supervised!(
      {UroRecs, name: name, endpoint: cluster.endpoint, model: "als", pool_size: 2}
    )

    %{cluster: cluster, pool: name}
  end

  @known for i <- 1..40, do: "user-#{i * 7}"
  @unknown ["user-nobody", "user-99999"]

  test "recommend, predict and similar_items answer exactly what the Python SDK answers", %{
    cluster: cluster,
    pool: pool
  } do
    users = @known ++ @unknown

    requests =
      for(user <- users, do: %{"op" => "recommend", "model" => "als", "user" => user, "n" => 10}) ++
        [
          %{
            "op" => "recommend",
            "model" => "als",
            "users" => users,
            "n" => 7,
            "filter_consumed" => false
          },
          %{
            "op" => "recommend",
            "model" => "deepfm",
            "user" => "user-14",
            "n" => 5,
            "exclude" => ["item-1", "item-2"]
          },
          %{
            "op" => "predict",
            "model" => "als",
            "user" => "user-21",
            "items" => ["item-1", "item-5", "item-nope"]
          },
          %{"op" => "similar_items", "model" => "als", "item" => "item-3", "n" => 8},
          # A sequence model, from the user's training items and from a sequence given.
          %{"op" => "recommend", "model" => "rnn4rec", "user" => "user-14", "n" => 10},
          %{
            "op" => "recommend",
            "model" => "rnn4rec",
            "user" => "user-14",
            "n" => 10,
            "seq" => ["item-3", "item-17", "item-250"]
          }
        ]

    python = TestCluster.python_answers(cluster, requests)

    elixir =
      for request <- requests do
        opts =
          for {key, atom} <- [
                {"n", :n},
                {"filter_consumed", :filter_consumed},
                {"exclude", :exclude},
                {"seq", :seq}
              ],
              Map.has_key?(request, key),
              do: {atom, request[key]}

        opts = [{:model, request["model"]} | opts]

        case request do
          %{"op" => "recommend", "users" => users} -> UroRecs.recommend(pool, users, opts)
          %{"op" => "recommend", "user" => user} -> UroRecs.recommend(pool, user, opts)
          %{"op" => "predict"} -> UroRecs.predict(pool, request["user"], request["items"], opts)
          %{"op" => "similar_items"} -> UroRecs.similar_items(pool, request["item"], opts)
        end
      end

    for {request, ex, py} <- Enum.zip([requests, elixir, python]) do
      assert {:ok, result} = ex, "#{inspect(request)}: #{inspect(ex)}"
      assert plain(result) == py, "differs for #{inspect(request)}"
    end

    # The comparison is not vacuous: known users get full lists, unknown ones cold starts.
    [{:ok, %Recommendation{items: items, cold_start: false}} | _] = elixir
    assert length(items) == 10

    assert {:ok, %Recommendation{cold_start: true}} = Enum.at(elixir, length(@known))

    # ... and the sequence given changed the sequence model's answer.
    [{:ok, from_training}, {:ok, from_seq}] = Enum.take(elixir, -2)
    assert length(from_seq.items) == 10 and from_seq.items != from_training.items
  end

  test "1,000 concurrent callers are all answered", %{pool: pool} do
    users = Stream.cycle(@known ++ @unknown) |> Enum.take(1_000)

    outcomes =
      users
      |> Enum.map(fn user ->
        Task.async(fn -> {user, UroRecs.recommend(pool, user, timeout: 10_000)} end)
      end)
      |> Task.await_many(30_000)

    for {user, outcome} <- outcomes do
      assert {:ok, %Recommendation{user: ^user, items: [_ | _]}} = outcome
    end
  end

  test "info and stats describe the served models", %{pool: pool} do
    assert {:ok, infos} = UroRecs.info(pool)
    by_name = Map.new(infos, &{&1.name, &1})
    assert %UroRecs.ModelInfo{version: "v1", class: "ALS", n_users: 300} = by_name["als"]
    assert "similar_items" in by_name["als"].ops
    refute "similar_items" in by_name["deepfm"].ops
    assert {:ok, %{"models" => %{"als" => %{"versions" => ["v1"]}}}} = UroRecs.stats(pool)
  end

  test "a worker killed with -9 under load is invisible to callers", %{agent: agent, pool: pool} do
    cluster = Agent.get(agent, & &1)
    [victim, _survivor] = cluster.workers["als"]
    load = start_load(pool, "als", 8)
    Process.sleep(500)
    TestCluster.signal(victim, "KILL")
    Process.sleep(1_000)
    outcomes = stop_load(load)

    assert length(outcomes) > 50

    assert Enum.all?(outcomes, &match?({:ok, %Recommendation{}}, &1)),
           inspect(Enum.reject(outcomes, &match?({:ok, _}, &1)))

    cluster = %{
      cluster
      | workers: %{cluster.workers | "als" => cluster.workers["als"] -- [victim]}
    }

    cluster = TestCluster.start_worker(cluster, "als")
    Agent.update(agent, fn _ -> cluster end)
    TestCluster.wait_for_workers(cluster, %{"als" => 2})
  end

  test "a broker restart: callers in the window get their answer or a retryable error, later calls succeed",
       %{agent: agent, pool: pool} do
    cluster = Agent.get(agent, & &1)
    load = start_load(pool, "als", 8)
    Process.sleep(300)
    TestCluster.signal(cluster.broker, "TERM")
    TestCluster.wait_exit(cluster.broker)
    cluster = TestCluster.start_broker(cluster)
    Agent.update(agent, fn _ -> cluster end)
    TestCluster.wait_for_workers(cluster, @workers)
    Process.sleep(300)
    outcomes = stop_load(load)

    for outcome <- outcomes do
      assert match?({:ok, %Recommendation{}}, outcome) or
               match?({:error, %Error{retry?: true}}, outcome),
             inspect(outcome)
    end

    # The same client, never restarted, is connected to the new broker.
    assert {:ok, %Recommendation{}} = UroRecs.recommend(pool, "user-7")
    assert Enum.count(outcomes, &match?({:ok, _}, &1)) > 0
  end

  test "every error code of the contract is produced by the sidecar and mapped", %{
    agent: agent,
    pool: pool
  } do
    cluster = Agent.get(agent, & &1)

    assert {:error, %Error{code: :bad_request, retry?: false}} =
             UroRecs.recommend(pool, "user-7", n: 0)

    users = for i <- 1..100, do: "user-#{i}"

    assert {:error, %Error{code: :too_large, retry?: false}} =
             UroRecs.recommend(pool, users, n: 300)

    assert {:error, %Error{code: :unknown_op}} = UroRecs.request(pool, "frobnicate", %{})

    assert {:error, %Error{code: :unknown_model}} =
             UroRecs.recommend(pool, "user-7", model: "nope")

    assert {:error, %Error{code: :unsupported}} =
             UroRecs.similar_items(pool, "item-3", model: "deepfm")

    # `seq` reaches the worker, which says ALS is not a sequence model.
    assert {:error, %Error{code: :unsupported, message: message}} =
             UroRecs.recommend(pool, "user-7", seq: ["item-3"], model: "als")

    assert message =~ "takes no seq"

    assert %Error{code: :unsupported_version, retry?: false} =
             raw_error(cluster, %{"v" => 2, "id" => 1, "op" => "info"})

    many = for i <- 1..1_000, do: "stranger-#{i}"

    assert {:error, %Error{code: :deadline_exceeded, retry?: false}} =
             UroRecs.recommend(pool, many, n: 20, timeout: 1)

    # overloaded: the spare model's only worker stopped, one connection that does not retry
    # sends more than the broker holds for one connection (1024).
    [spare] = cluster.workers["spare"]
    name = :"noretry_#{System.unique_integer([:positive])}"

    start_supervised!(
      {UroRecs,
       name: name,
       endpoint: cluster.endpoint,
       model: "spare",
       retry_attempts: 1,
       max_in_flight: 2_000},
      id: :noretry
    )

    TestCluster.signal(spare, "STOP")

    outcomes =
      try do
        1..1_100
        |> Enum.map(fn _ ->
          Task.async(fn -> UroRecs.recommend(name, "user-7", timeout: 400) end)
        end)
        |> Task.await_many(5_000)
      after
        TestCluster.signal(spare, "CONT")
      end

    assert Enum.any?(outcomes, &match?({:error, %Error{code: :overloaded, retry?: true}}, &1))

    # worker_lost: the worker holding the request dies and no other can take it. First the
    # worker catches up with the flood, so that the next request goes to it at once.
    TestCluster.wait_for_workers(cluster, %{"spare" => 1})
    wait_idle(pool, "spare")
    TestCluster.signal(spare, "STOP")
    held = Task.async(fn -> UroRecs.recommend(name, "user-7", timeout: 5_000) end)
    Process.sleep(200)
    TestCluster.signal(spare, "KILL")
    assert {:error, %Error{code: :worker_lost, retry?: true}} = Task.await(held)

    # unavailable: a configured model with no live worker is answered at once.
    started = System.monotonic_time(:millisecond)

    assert {:error, %Error{code: :unavailable, retry?: true}} =
             UroRecs.recommend(name, "user-7", timeout: 3_000)

    assert System.monotonic_time(:millisecond) - started < 1_000

    cluster =
      TestCluster.start_worker(
        %{cluster | workers: Map.put(cluster.workers, "spare", [])},
        "spare"
      )

    Agent.update(agent, fn _ -> cluster end)
    # internal has no trigger in a healthy sidecar; test/client_test.exs maps it from a
    # scripted broker.
  end

  # --- helpers ---------------------------------------------------------------------------

  # Results as the Python SDK's dataclasses serialize (asdict) them, for comparison.
  defp plain(list) when is_list(list), do: Enum.map(list, &plain/1)

  defp plain(%Recommendation{} = r),
    do: %{"user" => r.user, "items" => r.items, "cold_start" => r.cold_start}

  defp plain(%UroRecs.Prediction{} = p),
    do: %{"user" => p.user, "scores" => p.scores, "cold_start" => p.cold_start}

  defp plain(%UroRecs.SimilarItems{} = s),
    do: %{
      "item" => s.item,
      "items" => s.items,
      "scores" => s.scores,
      "cold_start" => s.cold_start
    }

  defp wait_idle(pool, model) do
    {:ok, %{"models" => models}} = UroRecs.stats(pool)

    unless match?(%{^model => %{"in_flight" => 0, "queued" => 0}}, models) do
      Process.sleep(50)
      wait_idle(pool, model)
    end
  end

  # Callers that loop on recommend until told to stop; returns their outcomes.
  defp start_load(pool, model, callers) do
    parent = self()
    ref = make_ref()

    pids =
      for i <- 1..callers do
        spawn_link(fn -> load_loop(pool, model, "user-#{i * 3}", ref, parent, []) end)
      end

    {ref, pids}
  end

  defp load_loop(pool, model, user, ref, parent, acc) do
    receive do
      {:stop, ^ref} -> send(parent, {ref, self(), acc})
    after
      0 ->
        outcome = UroRecs.recommend(pool, user, model: model)
        load_loop(pool, model, user, ref, parent, [outcome | acc])
    end
  end

  defp stop_load({ref, pids}) do
    for pid <- pids, do: send(pid, {:stop, ref})

    Enum.flat_map(pids, fn pid ->
      receive do
        {^ref, ^pid, outcomes} -> outcomes
      after
        10_000 -> flunk("a load caller did not stop")
      end
    end)
  end

  # One request over a raw ZMTP connection: for what the client itself never sends.
  defp raw_error(cluster, body) do
    "ipc://" <> path = cluster.endpoint
    {:ok, socket} = :gen_tcp.connect({:local, path}, 0, [:binary, active: false], 5_000)

    try do
      :ok = :gen_tcp.send(socket, [ZMTP.greeting(), ZMTP.ready_command()])
      {decoder, _} = read_until(socket, ZMTP.new(), &match?({:ready, _}, &1))
      :ok = :gen_tcp.send(socket, ZMTP.encode_request(Msgpack.encode!(body)))
      {_, {:message, ["", reply]}} = read_until(socket, decoder, &match?({:message, _}, &1))
      %{"ok" => false, "error" => error} = Msgpack.decode!(reply)
      Error.from_wire(error)
    after
      :gen_tcp.close(socket)
    end
  end

  defp read_until(socket, decoder, wanted?) do
    {:ok, bytes} = :gen_tcp.recv(socket, 0, 5_000)
    {:ok, decoder, events} = ZMTP.feed(decoder, bytes)

    case Enum.find(events, wanted?) do
      nil -> read_until(socket, decoder, wanted?)
      event -> {decoder, event}
    end
  end
end
