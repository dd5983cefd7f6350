# A load run of the Elixir client against a live broker; prints one JSON object on stdout.
#
#     mix run bench/load.exs -- --endpoint ipc:///run/uro-recs/client.sock --model als \
#       --users users.txt --mode latency --duration 10
#     mix run bench/load.exs -- --endpoint ... --users users.txt --mode closed --in-flight 256
#
# --mode latency: one caller, one `UroRecs.recommend` at a time, for --duration seconds.
# --mode closed: --in-flight processes share one pool (--pool-size connections, default 1),
# each calling `recommend` again as soon as it has its answer, until --duration seconds have
# passed; the run lasts until the last one has its answer.
#
# --users is a file of user ids, one a line; requests take them in order, cycling, one after
# the other across all callers. Before measuring, --warmup requests (default 200) go one at a
# time; the measured ones start again from the first line. Each call is
# `recommend(user, n: --n, timeout: --timeout)` (10, 5000 ms). Latency is from the call to its
# return (System.monotonic_time), percentiles by nearest rank, in ms.
#
# The JSON object: mode, in_flight, pool_size, duration_s, sent, ok, errors (count per error
# code), error_count, achieved_rate (answers without error per second), p50_ms, p90_ms,
# p99_ms, p999_ms, max_ms.
#
# Here, not in lib/ or test/: it is not part of the library.

defmodule UroRecsBench.Load do
  @switches [
    endpoint: :string,
    model: :string,
    users: :string,
    mode: :string,
    in_flight: :integer,
    pool_size: :integer,
    duration: :float,
    warmup: :integer,
    n: :integer,
    timeout: :integer
  ]

  @pool UroRecsBench.Pool

  def main(argv) do
    opts = parse(argv)
    users = read_users(opts.users)

    {:ok, _} =
      UroRecs.start_link(
        name: @pool,
        endpoint: opts.endpoint,
        model: opts.model,
        pool_size: opts.pool_size,
        timeout: opts.timeout
      )

    {counter, next_user} = cycle(users)
    call = fn -> UroRecs.recommend(@pool, next_user.(), n: opts.n, timeout: opts.timeout) end

    # Connects and warms up; a warm-up call that fails means there is nothing to measure.
    for _ <- 1..opts.warmup//1 do
      case call.() do
        {:ok, _} -> :ok
        {:error, error} -> fail("warm-up request failed: #{Exception.message(error)}")
      end
    end

    # The measured requests start again from the file's first user.
    :atomics.put(counter, 1, 0)

    {latencies, errors, duration} =
      case opts.mode do
        "latency" -> run_sequential(call, opts.duration)
        "closed" -> run_closed(call, opts.in_flight, opts.duration)
      end

    in_flight = if opts.mode == "latency", do: 1, else: opts.in_flight

    opts
    |> summary(in_flight, latencies, errors, duration)
    |> json()
    |> IO.puts()
  end

  defp parse(argv) do
    # `mix run bench/load.exs -- ARGS` hands the script the "--" too.
    argv = Enum.drop_while(argv, &(&1 == "--"))

    case OptionParser.parse(argv, strict: @switches) do
      {parsed, [], []} ->
        defaults = %{
          model: "als",
          mode: "latency",
          in_flight: 1,
          pool_size: 1,
          duration: 10.0,
          warmup: 200,
          n: 10,
          timeout: 5_000
        }

        opts = Map.merge(defaults, Map.new(parsed))

        for key <- [:endpoint, :users],
            not Map.has_key?(opts, key),
            do: fail("--#{key} is required")

        unless opts.mode in ["latency", "closed"],
          do: fail("--mode must be latency or closed, got #{inspect(opts.mode)}")

        unless opts.in_flight >= 1, do: fail("--in-flight must be at least 1")
        unless opts.duration > 0, do: fail("--duration must be positive")
        opts

      {_, rest, invalid} ->
        fail("cannot parse the arguments: #{inspect(rest ++ Enum.map(invalid, &elem(&1, 0)))}")
    end
  end

  defp read_users(path) do
    users =
      path
      |> File.read!()
      |> String.split("\n", trim: true)
      |> List.to_tuple()

    if tuple_size(users) == 0, do: fail("#{path} holds no user ids")
    users
  end

  # The next user id for any caller: one shared counter, so that the callers together walk
  # the file in order.
  defp cycle(users) do
    counter = :atomics.new(1, signed: false)
    size = tuple_size(users)
    {counter, fn -> elem(users, rem(:atomics.add_get(counter, 1, 1) - 1, size)) end}
  end

  defp run_sequential(call, duration_s) do
    started = now()
    {latencies, errors} = loop(call, started + seconds(duration_s), [], %{})
    {latencies, errors, now() - started}
  end

  defp run_closed(call, in_flight, duration_s) do
    parent = self()

    callers =
      for _ <- 1..in_flight do
        spawn_link(fn ->
          receive do
            {:go, until} -> send(parent, {:done, self(), loop(call, until, [], %{})})
          end
        end)
      end

    started = now()
    until = started + seconds(duration_s)
    Enum.each(callers, &send(&1, {:go, until}))

    {latencies, errors} =
      Enum.reduce(callers, {[], %{}}, fn caller, {latencies, errors} ->
        receive do
          {:done, ^caller, {more, more_errors}} ->
            {[more | latencies], Map.merge(errors, more_errors, fn _, a, b -> a + b end)}
        end
      end)

    {List.flatten(latencies), errors, now() - started}
  end

  # Latencies in native time units, errors counted by code.
  defp loop(call, until, latencies, errors) do
    began = now()

    if began >= until do
      {latencies, errors}
    else
      result = call.()
      latency = now() - began

      case result do
        {:ok, _} ->
          loop(call, until, [latency | latencies], errors)

        {:error, %UroRecs.Error{code: code}} ->
          loop(call, until, [latency | latencies], Map.update(errors, code, 1, &(&1 + 1)))
      end
    end
  end

  defp summary(opts, in_flight, latencies, errors, duration) do
    sorted = latencies |> Enum.sort() |> List.to_tuple()
    error_count = errors |> Map.values() |> Enum.sum()
    ok = tuple_size(sorted) - error_count
    duration_s = to_ms(duration) / 1000

    %{
      mode: opts.mode,
      in_flight: in_flight,
      pool_size: opts.pool_size,
      duration_s: Float.round(duration_s, 3),
      sent: tuple_size(sorted),
      ok: ok,
      errors: errors,
      error_count: error_count,
      achieved_rate: Float.round(ok / duration_s, 1),
      p50_ms: percentile(sorted, 50),
      p90_ms: percentile(sorted, 90),
      p99_ms: percentile(sorted, 99),
      p999_ms: percentile(sorted, 99.9),
      max_ms: percentile(sorted, 100)
    }
  end

  # Nearest rank: the smallest latency with at least p% of them at or below it.
  defp percentile({}, _p), do: nil

  defp percentile(sorted, p) do
    rank = max(ceil(p * tuple_size(sorted) / 100), 1)
    Float.round(to_ms(elem(sorted, rank - 1)), 4)
  end

  defp now, do: System.monotonic_time()
  defp seconds(s), do: round(s * System.convert_time_unit(1, :second, :native))
  defp to_ms(native), do: System.convert_time_unit(native, :native, :nanosecond) / 1_000_000

  defp fail(message) do
    IO.puts(:stderr, "bench/load.exs: #{message}")
    System.halt(2)
  end

  # Enough JSON for the summary: maps, strings, atoms, numbers, nil.
  defp json(map) when is_map(map) do
    fields =
      Enum.map_join(map, ",", fn {key, value} -> json(to_string(key)) <> ":" <> json(value) end)

    "{" <> fields <> "}"
  end

  defp json(nil), do: "null"
  defp json(value) when is_boolean(value), do: to_string(value)
  defp json(value) when is_atom(value), do: json(Atom.to_string(value))
  defp json(value) when is_integer(value), do: Integer.to_string(value)
  defp json(value) when is_float(value), do: :erlang.float_to_binary(value, [:short])

  defp json(value) when is_binary(value) do
    escaped =
      for <<char::utf8 <- value>>, into: "" do
        case char do
          ?" -> "\\\""
          ?\\ -> "\\\\"
          c when c < 0x20 -> "\\u" <> String.pad_leading(Integer.to_string(c, 16), 4, "0")
          c -> <<c::utf8>>
        end
      end

    "\"" <> escaped <> "\""
  end
end

UroRecsBench.Load.main(System.argv())
