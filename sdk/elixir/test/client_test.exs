defmodule UroRecs.ClientTest do
  # The client's own mechanics against a scripted broker (UroRecs.FakeBroker); the same
  # client against the real broker and workers is test/integration_test.exs.
  use ExUnit.Case, async: true

  alias UroRecs.{Error, FakeBroker, Recommendation}

  doctest UroRecs.Error

  @rec %{"user" => "u1", "items" => ["a", "b"], "cold_start" => false}

  defp start_pool(fake, opts \\ []) do
    name = :"pool_#{System.unique_integer([:positive])}"
    opts = Keyword.merge([name: name, endpoint: fake.endpoint, model: "als"], opts)
    start_supervised!({UroRecs, opts})
    name
  end

  defp fake(handler, opts \\ []) do
    fake = FakeBroker.start([handler: handler] ++ opts)
    on_exit(fn -> FakeBroker.stop(fake) end)
    fake
  end

  describe "requests and replies" do
    test "a recommend carries v, id, op, model, args and timeout_ms, and parses its result" do
      fake = fake(fn request, _ -> {:reply, FakeBroker.ok(request, @rec)} end)
      pool = start_pool(fake)

      assert {:ok, %Recommendation{user: "u1", items: ["a", "b"], cold_start: false}} =
               UroRecs.recommend(pool, "u1", n: 2, exclude: ["z"], timeout: 800)

      assert_receive {:fake_request, 1, request}
      assert %{"v" => 1, "op" => "recommend", "model" => "als"} = request

      assert request["args"] == %{
               "user" => "u1",
               "n" => 2,
               "filter_consumed" => true,
               "exclude" => ["z"]
             }

      assert is_integer(request["id"])
      assert request["timeout_ms"] in 700..800
    end

    test "ops without a model send none, and each op's result becomes its struct" do
      fake =
        fake(fn request, _ ->
          result =
            case request["op"] do
              "info" ->
                %{
                  "models" => [
                    %{
                      "name" => "als",
                      "version" => "v1",
                      "workers" => 2,
                      "class" => "ALS",
                      "n_users" => 5,
                      "n_items" => 7,
                      "ops" => ["recommend"]
                    }
                  ]
                }

              "stats" ->
                %{"uptime_s" => 1.5, "draining" => false, "models" => %{}, "counters" => %{}}

              "predict" ->
                %{"user" => 1, "scores" => [0.5, nil, 2], "cold_start" => true}

              "similar_items" ->
                %{"item" => 9, "items" => [1, 2], "scores" => [0.9, 0.8], "cold_start" => false}

              "ingest" ->
                %{"accepted" => length(request["args"]["events"])}
            end

          {:reply, FakeBroker.ok(request, result)}
        end)

      pool = start_pool(fake)

      assert {:ok,
              [%UroRecs.ModelInfo{name: "als", class: "ALS", workers: 2, ops: ["recommend"]}]} =
               UroRecs.info(pool)

      assert_receive {:fake_request, _, info}
      refute Map.has_key?(info, "model")

      assert {:ok, %{"draining" => false}} = UroRecs.stats(pool)

      assert {:ok, %UroRecs.Prediction{user: 1, scores: [0.5, nil, 2.0], cold_start: true}} =
               UroRecs.predict(pool, 1, [1, 2, 3])

      assert {:ok, %UroRecs.SimilarItems{item: 9, items: [1, 2], scores: [0.9, 0.8]}} =
               UroRecs.similar_items(pool, 9, n: 2)

      event = %{
        user_id: "6f1c1b9a-4c1e-4a8e-9d59-1f0b8d2b7a31",
        item_kind: "map",
        item_id: "7f1c1b9a-4c1e-4a8e-9d59-1f0b8d2b7a31",
        event: "play",
        occurred_at: ~U[2026-12-01 10:00:00.000001Z]
      }

      assert {:ok, 2500} = UroRecs.ingest(pool, List.duplicate(event, 2500))

      ingests =
        for _ <- 1..3, do: assert_receive({:fake_request, _, %{"op" => "ingest"} = r}) && r

      assert Enum.map(ingests, &length(&1["args"]["events"])) |> Enum.sort() == [500, 1000, 1000]
      [first | _] = hd(ingests)["args"]["events"]

      assert first["occurred_at_us"] ==
               DateTime.to_unix(~U[2026-12-01 10:00:00.000001Z], :microsecond)

      refute Map.has_key?(first, "weight")
    end

    test "replies are matched by id, not by order" do
      # Holds the first 20 requests, then answers them all in reverse order.
      fake =
        fake(fn request, _ ->
          held = [request | Process.get(:held, [])]
          Process.put(:held, held)

          if length(held) == 20 do
            {:replies,
             for r <- held do
               FakeBroker.ok(r, %{@rec | "user" => r["args"]["user"]})
             end}
          else
            :noreply
          end
        end)

      pool = start_pool(fake)
      callers = for i <- 1..20, do: Task.async(fn -> {i, UroRecs.recommend(pool, "user#{i}")} end)

      for {i, outcome} <- Task.await_many(callers) do
        assert {:ok, %Recommendation{user: user}} = outcome
        assert user == "user#{i}"
      end

      ids = for _ <- 1..20, do: assert_receive({:fake_request, 1, r}) && r["id"]
      assert length(Enum.uniq(ids)) == 20
    end

    test "a late or unknown reply id is dropped, and the right caller gets its answer" do
      fake =
        fake(fn request, _ ->
          # A reply to an id nobody waits for comes first.
          {:reply, FakeBroker.ok(%{"id" => request["id"] + 1000}, @rec)}
        end)

      pool = start_pool(fake, timeout: 100)
      assert {:error, %Error{code: :deadline_exceeded}} = UroRecs.recommend(pool, "u1")
    end
  end

  describe "retries" do
    test "retryable errors are retried with backoff, then succeed" do
      fake =
        fake(fn request, _ ->
          count = Process.get(:count, 0) + 1
          Process.put(:count, count)

          if count < 3,
            do: {:reply, FakeBroker.error(request, "overloaded", true)},
            else: {:reply, FakeBroker.ok(request, @rec)}
        end)

      pool = start_pool(fake)
      assert {:ok, %Recommendation{}} = UroRecs.recommend(pool, "u1")
      for _ <- 1..3, do: assert_receive({:fake_request, 1, _})
    end

    test "after retry_attempts the last retryable error is returned" do
      fake = fake(fn request, _ -> {:reply, FakeBroker.error(request, "worker_lost", true)} end)
      pool = start_pool(fake, retry_attempts: 2)

      assert {:error, %Error{code: :worker_lost, retry?: true, message: "scripted worker_lost"}} =
               UroRecs.recommend(pool, "u1")

      for _ <- 1..2, do: assert_receive({:fake_request, 1, _})
      refute_receive {:fake_request, _, _}, 50
    end

    test "a non-retryable error is returned at once" do
      fake = fake(fn request, _ -> {:reply, FakeBroker.error(request, "bad_request")} end)
      pool = start_pool(fake)
      assert {:error, %Error{code: :bad_request, retry?: false}} = UroRecs.recommend(pool, "u1")
      assert_receive {:fake_request, 1, _}
      refute_receive {:fake_request, _, _}, 50
    end

    test "no retry whose backoff would reach the deadline" do
      fake = fake(fn request, _ -> {:reply, FakeBroker.error(request, "unavailable", true)} end)
      pool = start_pool(fake, retry_backoff: 400, retry_max_backoff: 400, timeout: 150)
      assert {:error, %Error{code: :unavailable}} = UroRecs.recommend(pool, "u1")
      assert_receive {:fake_request, 1, _}
      refute_receive {:fake_request, _, _}, 50
    end
  end

  describe "errors and malformed replies" do
    test "every code of the contract maps to its atom and retry flag" do
      for code <- Error.codes() do
        retry = code in [:overloaded, :unavailable, :worker_lost]
        wire = %{"code" => Atom.to_string(code), "message" => "m", "retry" => retry}
        assert %Error{code: ^code, retry?: ^retry, message: "m"} = Error.from_wire(wire)
      end

      assert %Error{code: :internal, message: "new_code: m", retry?: true} =
               Error.from_wire(%{"code" => "new_code", "message" => "m", "retry" => true})

      assert %Error{code: :internal} = Error.from_wire(%{"code" => 5})
    end

    test "a server's internal error, and a result that breaks the contract, are :internal" do
      fake =
        fake(fn request, _ ->
          case request["args"]["user"] do
            "bug" -> {:reply, FakeBroker.error(request, "internal")}
            "bad" -> {:reply, FakeBroker.ok(request, %{"user" => "bad", "items" => "x"})}
            "worse" -> {:reply, %{"id" => request["id"], "ok" => "maybe"}}
          end
        end)

      pool = start_pool(fake)

      assert {:error, %Error{code: :internal, message: "scripted internal"}} =
               UroRecs.recommend(pool, "bug")

      assert {:error, %Error{code: :internal, message: "malformed result: " <> _}} =
               UroRecs.recommend(pool, "bad")

      assert {:error, %Error{code: :internal, message: "malformed reply: " <> _}} =
               UroRecs.recommend(pool, "worse")
    end

    test "a many-users reply with the wrong number of results is :internal" do
      fake = fake(fn request, _ -> {:reply, FakeBroker.ok(request, %{"results" => [@rec]})} end)
      pool = start_pool(fake)

      assert {:error,
              %Error{
                code: :internal,
                message: "malformed result: asked for 2 users, got 1 results"
              }} = UroRecs.recommend(pool, ["u1", "u2"])
    end

    test "a request that cannot be encoded is :bad_request and never sent" do
      fake = fake(fn request, _ -> {:reply, FakeBroker.ok(request, @rec)} end)
      pool = start_pool(fake)

      assert {:error, %Error{code: :bad_request, message: "cannot encode" <> _}} =
               UroRecs.recommend(pool, {:a, self()})

      assert {:error, %Error{code: :bad_request}} = UroRecs.recommend(pool, <<0xFF>>)
      refute_receive {:fake_request, _, _}, 50
    end

    test "arguments that can never work raise" do
      fake = fake(fn request, _ -> {:reply, FakeBroker.ok(request, @rec)} end)
      pool = start_pool(fake, model: nil)
      assert_raise ArgumentError, ~r/no :model given/, fn -> UroRecs.recommend(pool, "u1") end

      assert_raise ArgumentError, ~r/timeout must be/, fn ->
        UroRecs.recommend(pool, "u1", model: "als", timeout: 0)
      end

      assert_raise ArgumentError, ~r/unknown keys/, fn ->
        UroRecs.recommend(pool, "u1", count: 3)
      end

      assert_raise ArgumentError, ~r/no UroRecs pool named/, fn -> UroRecs.info(:no_such_pool) end

      assert_raise ArgumentError, ~r/endpoint/, fn ->
        UroRecs.Client.config(endpoint: "http://x")
      end
    end
  end

  describe "connections" do
    test "with no broker, a call gets :unavailable by its deadline, saying why" do
      path = Path.join(System.tmp_dir!(), "nobody-#{System.unique_integer([:positive])}.sock")
      name = :"pool_#{System.unique_integer([:positive])}"
      start_supervised!({UroRecs, name: name, endpoint: "ipc://" <> path, model: "als"})
      started = System.monotonic_time(:millisecond)

      assert {:error, %Error{code: :unavailable, retry?: true, message: message}} =
               UroRecs.recommend(name, "u1", timeout: 200)

      assert (System.monotonic_time(:millisecond) - started) in 190..600
      assert message =~ "cannot connect to ipc://#{path}"
    end

    test "a dropped connection is reopened and its requests sent again" do
      fake =
        fake(fn request, connection ->
          if connection == 1, do: :close, else: {:reply, FakeBroker.ok(request, @rec)}
        end)

      pool = start_pool(fake)
      assert {:ok, %Recommendation{}} = UroRecs.recommend(pool, "u1")
      assert_receive {:fake_request, 1, first}
      assert_receive {:fake_request, 2, again}
      assert again["id"] == first["id"]
      assert again["timeout_ms"] <= first["timeout_ms"]
    end

    test "a broker that goes silent (no PONG) is dropped after liveness_timeout" do
      fake = fake(fn _request, _ -> :noreply end, answer_pings: false)
      pool = start_pool(fake, ping_interval: 50, liveness_timeout: 200, timeout: 2_000)
      task = Task.async(fn -> UroRecs.recommend(pool, "u1") end)
      assert_receive {:fake_request, 1, first}, 1_000
      # The silent connection is given up and the request sent again on a new one.
      assert_receive {:fake_connected, 2}, 1_000
      assert_receive {:fake_request, 2, again}, 1_000
      assert again["id"] == first["id"]
      Task.shutdown(task, :brutal_kill)
    end

    test "a broker that answers PINGs keeps an idle connection open" do
      fake = fake(fn request, _ -> {:reply, FakeBroker.ok(request, @rec)} end)
      pool = start_pool(fake, ping_interval: 30, liveness_timeout: 120)
      assert {:ok, _} = UroRecs.recommend(pool, "u1")
      Process.sleep(400)
      refute_received {:fake_connected, 2}
      assert {:ok, _} = UroRecs.recommend(pool, "u1")
    end

    test "past max_in_flight a call is :overloaded at once" do
      fake = fake(fn _request, _ -> :noreply end)
      pool = start_pool(fake, max_in_flight: 2, timeout: 2_000)
      held = for _ <- 1..2, do: Task.async(fn -> UroRecs.recommend(pool, "u1") end)
      for _ <- 1..2, do: assert_receive({:fake_request, 1, _})

      assert {:error, %Error{code: :overloaded, retry?: true, message: message}} =
               UroRecs.recommend(pool, "u1")

      assert message =~ "max_in_flight"
      Enum.each(held, &Task.shutdown(&1, :brutal_kill))
    end

    test "a pool spreads calls over its connections" do
      fake = fake(fn request, _ -> {:reply, FakeBroker.ok(request, @rec)} end)
      pool = start_pool(fake, pool_size: 3)
      for _ <- 1..6, do: assert({:ok, _} = UroRecs.recommend(pool, "u1"))
      connected = for _ <- 1..3, do: assert_receive({:fake_connected, n}) && n
      assert Enum.sort(connected) == [1, 2, 3]
      seen = for _ <- 1..6, do: assert_receive({:fake_request, n, _}) && n
      assert Enum.frequencies(seen) == %{1 => 2, 2 => 2, 3 => 2}
    end
  end

  describe "telemetry" do
    setup do
      UroRecs.TelemetryRecorder.record(self())
      on_exit(fn -> UroRecs.TelemetryRecorder.stop() end)
    end

    test "start and stop events, with the outcome" do
      fake =
        fake(fn request, _ ->
          case request["args"]["user"] do
            "ok" -> {:reply, FakeBroker.ok(request, @rec)}
            _ -> {:reply, FakeBroker.error(request, "unknown_model")}
          end
        end)

      pool = start_pool(fake)
      assert {:ok, _} = UroRecs.recommend(pool, "ok")

      assert_receive {:telemetry, [:uro_recs, :request, :start], %{system_time: _},
                      %{client: ^pool} = meta}

      assert meta == %{client: pool, op: :recommend, model: "als"}

      assert_receive {:telemetry, [:uro_recs, :request, :stop], %{duration: d},
                      %{client: ^pool, result: :ok, error: nil}}

      assert d > 0

      assert {:error, _} = UroRecs.recommend(pool, "nope")

      assert_receive {:telemetry, [:uro_recs, :request, :stop], _,
                      %{client: ^pool, result: :error, error: %Error{code: :unknown_model}}}

      assert_raise ArgumentError, fn -> UroRecs.recommend(pool, "ok", timeout: -1) end
      assert_receive {:telemetry, [:uro_recs, :request, :start], _, %{client: ^pool}}

      assert_receive {:telemetry, [:uro_recs, :request, :exception], %{duration: _},
                      %{client: ^pool, kind: :error, reason: %ArgumentError{}}}
    end
  end
end
